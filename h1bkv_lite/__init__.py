"""h1bkv_lite: SimHash (1-bit) key sketches, low-bit values and the H1B-KV attention they serve.

Core (plain torch, CPU and CUDA; the reference every Triton kernel is checked against):

- :class:`SimHashSketcher` -- sketch, unpack, Hamming distance, cosine estimate.
- :func:`quantize_values` / :class:`QuantizedTensor` -- 2/4/8-bit affine value quantization.
- :func:`h1b_attention` -- attention over sketched keys and quantized values ("hamming", "cos", "asym").
- :mod:`h1bkv_lite.memory` -- byte-exact KV-cache accounting for FP16, H1B and the baselines.

With transformers (imported lazily, on first use of these names):

- :class:`H1BCache` -- a drop-in ``transformers`` cache holding keys as sketches and values as 4-bit.
- :class:`FP16Cache`, :class:`KIVICache`, :class:`EvictionCache`, :class:`LokiCache` -- the baselines.
- :func:`load_model`, :func:`load_corpus` -- the bundled offline model and text.
- :func:`generate_greedy` -- greedy decoding over ``H1BCache(max_cache_len=...)``, each decode step one replayed
  CUDA graph (:mod:`h1bkv_lite.graphs`); :func:`decode_with_cuda_graphs`, the same inside ``model.generate``
  (``custom_generate=decode_with_cuda_graphs``: its logits processors, sampling and stopping criteria).
"""
import importlib

from .attention import SCORES, calibrate_temperature, h1b_attention, sketched_logits
from .quant import QuantizedTensor, quantize_values
from .sketch import SimHashSketcher

_LAZY = {
    "H1BCache": "cache",
    "fit_temperature": "cache",
    "FP16Cache": "baselines",
    "KIVICache": "baselines",
    "EvictionCache": "baselines",
    "LokiCache": "baselines",
    "calibrate_loki": "baselines",
    "load_model": "data",
    "load_corpus": "data",
    "generate_greedy": "graphs",
    "decode_with_cuda_graphs": "graphs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "SCORES",
    "QuantizedTensor",
    "SimHashSketcher",
    "calibrate_temperature",
    "h1b_attention",
    "quantize_values",
    "sketched_logits",
]
__version__ = "0.1.0"
