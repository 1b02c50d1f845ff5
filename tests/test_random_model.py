"""h1bkv_lite.random_model: random-init models of a preset's shape, saved as a folder load_model reads."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from h1bkv_lite import random_model as rm
from h1bkv_lite.data import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    """The tiny preset, bfloat16, seed 3, saved with the bundled tokenizer."""
    out = tmp_path_factory.mktemp("rand") / "tiny-random"
    assert rm.save_random_model("tiny", out, tokenizer=tokenizer, dtype=torch.bfloat16, seed=3) == out
    return out


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_presets_kept():
    assert list(rm.PRESETS) == ["llama-2-7b", "llama-3-8b", "tiny"]
    assert rm.PRESETS["llama-2-7b"] == dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                            max_position_embeddings=131072)
    config = rm.random_config("llama-3-8b", vocab_size=500)
    assert (config.vocab_size, config.num_key_value_heads, config.rope_parameters["rope_theta"]) == (500, 8, 500000.0)
    assert config._attn_implementation == "sdpa"
    assert rm.random_config("tiny").vocab_size == 1024  # a fresh config each call: the override did not stick


def test_saved_folder_loads_and_runs(saved_tiny, tokenizer):
    model, tok = load_model(str(saved_tiny), dtype=torch.bfloat16)
    assert model.config.vocab_size == len(tokenizer) == len(tok) == 49152
    assert model.get_input_embeddings().weight.shape == (49152, 512)
    assert model.dtype == torch.bfloat16 and not model.training
    # the tokenizer's special tokens are the config's
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    # the weights written are those random_model draws for the same seed
    assert _same_weights(model, rm.random_model("tiny", dtype="bfloat16", seed=3, vocab_size=len(tokenizer)))


def test_saved_dtype_kept_on_disk(saved_tiny):
    assert json.loads((saved_tiny / "config.json").read_text())["dtype"] == "bfloat16"
    files = sorted(saved_tiny.glob("*.safetensors"))
    assert files
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert load_model(str(saved_tiny))[0].dtype == torch.float32  # load_model's own dtype casts, as for any model
    config = rm.random_config(saved_tiny)  # any config folder (a Path is taken as its path), not only presets
    assert (config.vocab_size, config.hidden_size, config._attn_implementation) == (49152, 512, "sdpa")


def test_random_model_seed_dtype_device():
    a = rm.random_model("tiny", seed=0)
    assert a.dtype == torch.float16 and not a.training and a.config._attn_implementation == "sdpa"
    assert _same_weights(a, rm.random_model("tiny", seed=0))
    assert not _same_weights(a, rm.random_model("tiny", seed=1))
    assert rm.random_model("tiny", dtype=torch.float32).dtype == torch.float32
    meta = rm.random_model("llama-2-7b", dtype="bfloat16", device="meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in meta.parameters()) == 6_738_415_616
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"name='no-such-model-xyz' is neither a preset \(llama-2-7b, llama-3-8b, "
                                         r"tiny\)") as info:
        rm.random_config("no-such-model-xyz")
    assert isinstance(info.value.__cause__, OSError)  # what AutoConfig raises offline, kept as the cause
    with pytest.raises(ValueError, match="is neither a preset"):
        rm.random_model("Llama-2-7B")  # presets are matched exactly
    for bad in (None, 7, ""):
        with pytest.raises(TypeError, match="name must be a non-empty str"):
            rm.random_config(bad)


def test_bad_arguments(tmp_path):
    for bad in ("fp16", "int8", torch.int8, None):
        with pytest.raises(ValueError, match=r"dtype must be one of 'float32', 'float16', 'bfloat16', got"):
            rm.random_model("tiny", dtype=bad)
    with pytest.raises(ValueError, match="dtype must be one of"):  # checked before the tokenizer is loaded
        rm.save_random_model("tiny", tmp_path / "x", dtype="half")
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, inf\]"):
        rm.random_config("tiny", vocab_size=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        rm.save_random_model("tiny", tmp_path / "full")
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path):
    out = tmp_path / "cli-tiny"
    done = subprocess.run([sys.executable, "-m", "h1bkv_lite.random_model", "tiny", "--out", str(out),
                           "--dtype", "float16", "--seed", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["vocab_size"], config["num_hidden_layers"]) == ("float16", 49152, 4)
    assert (out / "tokenizer.json").is_file()
    again = subprocess.run([sys.executable, "-m", "h1bkv_lite.random_model", "tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "not empty" in again.stderr
    helped = subprocess.run([sys.executable, "-m", "h1bkv_lite.random_model", "--help"], capture_output=True,
                            text=True, timeout=600)
    assert helped.returncode == 0 and "--tokenizer" in helped.stdout and "llama-2-7b" in helped.stdout


def test_cli_errors_in_process(capsys):
    with pytest.raises(SystemExit) as info:
        rm.main(["no-such-model-xyz", "--out", "/nonexistent/never-written"])
    assert info.value.code == 2 and "is neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rm.main(["tiny", "--out", "/nonexistent/never-written", "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_warns_when_the_host_lacks_memory(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(rm, "_available_host_bytes", lambda: 10**6)  # 1 MB available
    with pytest.warns(UserWarning, match=r"needs 0\.1 GB of host memory in float16, more than the 0\.0 GB"):
        rm.save_random_model("tiny", tmp_path / "m", tokenizer=tokenizer, dtype="float16")
    assert (tmp_path / "m" / "config.json").is_file()
