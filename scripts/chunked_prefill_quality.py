"""What a chunked prefill changes in quality: long-context decode perplexity of the bundled model with the prefill in
one forward and in chunks (``decode_perplexity(..., prefill_chunk=...)``), FP16 and H1B (calibrated "hamming").

    python scripts/chunked_prefill_quality.py            # -> results/chunked_prefill/decode_ppl_bundled.json

With an H1B cache a chunked prefill's later chunks see the earlier ones compressed (``h1bkv_lite.chunk_attention``),
where a prefill in one forward attends exactly within the prompt; the scored tokens come from decode steps either
way. About 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch

from h1bkv_lite import H1BCache
from h1bkv_lite.data import load_model
from h1bkv_lite.eval import decode_perplexity
from h1bkv_lite.runtime import configure_offline

PREFILL, DECODE, WINDOWS, CHUNKS = 1024, 128, 4, (None, 512, 256)
OUT = Path(__file__).resolve().parents[1] / "results" / "chunked_prefill" / "decode_ppl_bundled.json"


def main() -> None:
    configure_offline()
    torch.manual_seed(0)
    model, tokenizer = load_model()
    methods = {"fp16": "fp16", "h1b b=128": functools.partial(H1BCache, bits=128),
               "h1b b=256": functools.partial(H1BCache, bits=256)}
    rows = []
    for name, method in methods.items():
        for chunk in (None,) if name == "fp16" else CHUNKS:
            start = time.perf_counter()
            df = decode_perplexity(model, tokenizer, method, prefill=PREFILL, decode=DECODE, n_windows=WINDOWS,
                                   prefill_chunk=chunk, progress=False)
            rows.append({"method": name, "prefill_chunk": chunk, "ppl": math.exp(df.nll.sum() / df.tokens.sum()),
                         "window_nll": df.nll.tolist(), "seconds": time.perf_counter() - start})
            print(f"{name:10s} chunk={chunk}: ppl {rows[-1]['ppl']:.2f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": "bundled SmolLM2-135M (fp32, CPU)", "prefill": PREFILL, "decode": DECODE,
                               "windows": WINDOWS, "rows": rows}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
