"""benchmarks/kernel_resources.py: the decode split kernel compiled for sm_90 on a machine without a GPU, its
resources read back. (Whether it spills depends on the Triton version: that is a finding, not a test.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return done


@pytest.mark.parametrize("args", [(), ("--group", "4", "--score", "cos", "--static", "--config", "block_n=32"),
                                  ("--group", "8", "--query-here", "--config", "block_n=32")])
def test_compiles_for_sm90_and_reads_the_resources(args):
    done = _run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["arch"] == 90 and 1 <= row["registers"] <= 255
    assert row["sass_instructions"] > 100 and row["global_loads"] > 0
    assert row["stack_bytes"] >= 0 and row["spill_stores"] >= 0
    # the loop over the cache's tiles: a strict part of the kernel, with its loads, and the per-tile work's opcodes
    assert 50 < row["loop_instructions"] < row["sass_instructions"]
    assert sum(row["loop_opcodes"].values()) <= row["loop_instructions"] and "LOP3" in row["loop_opcodes"]
    assert row["config"]["block_n"] == (32 if args else 128)
    assert row["query_here"] == ("--query-here" in args)


def test_bad_config_is_refused_by_name():
    done = _run("--config", "tile=64")
    assert done.returncode == 2 and "--config" in done.stderr


def test_main_loop_finds_the_tile_loop_in_both_branch_forms():
    """cuobjdump writes branch targets as labels or as addresses (by version), and back-edges may carry a
    modifier (BRA.U); of two loops the one with the more LOP3 instructions is the tile loop."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_resources import main_loop

    def line(addr, text):
        return f"        /*{addr:04x}*/                   {text} ;"

    window = [line(0x10, "FADD R1, R1, R2"), line(0x20, "FFMA R3, R1, R2, R3"), line(0x30, "BRA 0x10")]
    tile = [line(0x40, "LOP3.LUT R4, R4, 0xf, RZ, 0xc0, !PT"), line(0x50, "LOP3.LUT R5, R4, 0xf0, RZ, 0xc0, !PT"),
            line(0x60, "@P0 BRA.U 0x40")]
    opcodes = [ln.split("*/")[1].split()[0] for ln in main_loop("\n".join(window + tile))]
    assert opcodes == ["LOP3.LUT", "LOP3.LUT", "@P0"]
    labelled = ["        .L_x_7:", line(0x40, "LOP3.LUT R4, R4, 0xf, RZ, 0xc0, !PT"), line(0x50, "BRA `(.L_x_7)")]
    assert len(main_loop("\n".join(window + labelled))) == 2
    assert main_loop("\n".join(line(0x10 * i, "NOP") for i in range(1, 4))) == []
