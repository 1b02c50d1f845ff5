"""Where the prefill's per-layer host work goes: torch ops (dispatches) and host time by part of the cache,
H1BCache against DynamicCache, on one forward of a random-init Llama.

    python benchmarks/profile_prefill.py --device cpu --prompt 8192                     # tiny compute, 2 heads
    python benchmarks/profile_prefill.py --device meta --preset llama-2-7b --prompt 8192  # real shapes, no compute

On a GPU every torch op that is not a view is a kernel launch (~5-20 us of host time; views cost a few us), so
the number of ops per layer is what a prefill pays beyond its compute. The ops are counted with a ``TorchDispatchMode`` (every aten op that reaches dispatch,
views included) and attributed to the innermost part of the cache that issued them:

``calibration``  ``H1BLayer._after_prompt`` (padding read, "hamming" temperature: ``sampled_temperature``)
``prompt_attention``  the exact prompt attention (``prompt_attention``: SDPA)
``compression``  ``CompressingLayer._settle`` minus the above (the prompt compressed into the store)
``update``  ``HookedLayer.update`` (the tokens referenced, the hook)
``model``  everything else of the forward (projections, RoPE, MLP, norms; DynamicCache's own update)

On ``--device meta`` nothing is computed (meta tensors carry shapes only), so the wall time is host work alone
(Python and dispatch; the paths are those of a CUDA run except the compression, which is one Triton launch on
CUDA and the torch path here). On ``--device cpu`` the wall time includes the compute.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from h1bkv_lite import H1BCache, cache as cache_mod

PRESETS = {  # the attention structure of the models benchmarks/generate.py times (hidden sizes shrunk on CPU)
    "tiny": dict(num_attention_heads=2, num_key_value_heads=2),
    "tiny-gqa": dict(num_attention_heads=2, num_key_value_heads=1),
    "llama-2-7b": dict(num_attention_heads=32, num_key_value_heads=32),
    "llama-3-8b": dict(num_attention_heads=32, num_key_value_heads=8),
}


class OpCounter(TorchDispatchMode):
    """Counts aten ops by the innermost part (label) active when they are dispatched; times the parts."""

    def __init__(self, counting: bool = True):
        super().__init__()
        self.counting = counting
        self.ops: Counter = Counter()
        self.by_op: dict[str, Counter] = defaultdict(Counter)
        self.seconds: Counter = Counter()
        self.stack = ["model"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        label = self.stack[-1]
        self.ops[label] += 1
        self.by_op[label][func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def part(self, label):
        self.stack.append(label)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.stack.pop()
            self.seconds[label] += dt
            if self.stack[-1] != "model":  # host time is exclusive, like the op counts
                self.seconds[self.stack[-1]] -= dt


def _wrap(counter_ref, owner, name, label):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        counter = counter_ref[0]
        if counter is None:
            return original(*args, **kwargs)
        with counter.part(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    return owner, name, original


@contextlib.contextmanager
def instrumented(counter: OpCounter):
    ref = [counter]
    patches = [
        _wrap(ref, cache_mod.H1BLayer, "_after_prompt", "calibration"),
        _wrap(ref, cache_mod, "prompt_attention", "prompt_attention"),
        _wrap(ref, cache_mod.CompressingLayer, "_settle", "compression"),
        _wrap(ref, cache_mod.HookedLayer, "update", "update"),
    ]
    try:
        with counter if counter.counting else contextlib.nullcontext():
            yield
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)


def build(preset: str, device: str, layers: int, hidden: int, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers, head_dim=128,
                         vocab_size=1000, max_position_embeddings=1 << 18, attn_implementation="sdpa",
                         **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


@torch.no_grad()
def prefill(model, make_cache, prompt: int, device: str, counting: bool = True):
    ids = torch.randint(3, 1000, (1, prompt), device=device)
    # an all-ones mask as generate() passes (transformers reads it on the host and hands attention None); meta
    # tensors cannot be read, so there the mask is left out (the same None reaches the cache)
    mask = None if device == "meta" else torch.ones_like(ids)
    cache = make_cache()
    counter = OpCounter(counting)
    t0 = time.perf_counter()
    with instrumented(counter):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return counter, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "meta", "cuda"])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--bits", type=int, default=128)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="H1BCache backend (triton on CPU: set TRITON_INTERPRET=1; counts the CUDA path's torch ops)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="model dtype (default: float32 on cpu, float16 elsewhere)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (the fastest is reported)")
    p.add_argument("--top", type=int, default=0, help="also list the most frequent ops of each H1B part")
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    model = build(args.preset, args.device, args.layers, args.hidden, dtype)
    caches = {"dynamic": lambda: DynamicCache(config=model.config),
              "h1b": lambda: H1BCache(model.config, bits=args.bits, backend=args.backend)}
    prefill(model, caches["h1b"], min(args.prompt, 64), args.device)  # warm-up (imports, first calls)
    L = args.layers
    print(f"{args.preset} (heads {model.config.num_attention_heads}/{model.config.num_key_value_heads}, head_dim 128),"
          f" {dtype}, device {args.device}, prompt {args.prompt}, {L} layers, bits {args.bits}; per layer:")
    for name, make in caches.items():
        counter, _ = prefill(model, make, args.prompt, args.device)  # op counts (the dispatch mode slows ops)
        timer, wall = min((prefill(model, make, args.prompt, args.device, counting=False)
                           for _ in range(args.repeat)), key=lambda r: r[1])  # host times, without the mode
        total = sum(counter.ops.values())
        parts = ", ".join(f"{k} {v / L:.0f} ops / {timer.seconds[k] / L * 1e3:.1f} ms"
                          for k, v in sorted(counter.ops.items()) if k != "model")
        print(f"  {name:8s} all {total / L:.0f} ops, {wall / L * 1e3:.1f} ms | model {counter.ops['model'] / L:.0f} ops"
              + (f" | {parts}" if parts else ""))
        if args.top and name == "h1b":
            for k, ops in sorted(counter.by_op.items()):
                if k != "model":
                    print(f"    {k}: " + ", ".join(f"{op} {n / L:g}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
