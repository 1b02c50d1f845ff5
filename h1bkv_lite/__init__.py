"""h1bkv_lite: SimHash (1-bit) key sketches, low-bit values and the H1B-KV attention they serve.

Core (plain torch, CPU and CUDA; the reference every Triton kernel is checked against):

- :class:`SimHashSketcher` -- sketch, unpack, Hamming distance, cosine estimate.
- :func:`quantize_values` / :class:`QuantizedTensor` -- 2/4/8-bit affine value quantization.
- :func:`h1b_attention` -- attention over sketched keys and quantized values ("hamming", "cos", "asym").
- :mod:`h1bkv_lite.memory` -- byte-exact KV-cache accounting for FP16, H1B and the baselines.
"""
from .attention import SCORES, calibrate_temperature, h1b_attention, sketched_logits
from .quant import QuantizedTensor, quantize_values
from .sketch import SimHashSketcher

__all__ = [
    "SCORES",
    "QuantizedTensor",
    "SimHashSketcher",
    "calibrate_temperature",
    "h1b_attention",
    "quantize_values",
    "sketched_logits",
]
__version__ = "0.1.0"
