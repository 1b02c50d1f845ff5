"""Multi-token calls over a layer that holds tokens (chunked prefill): the flash path of
``h1bkv_lite.chunk_attention`` against the general path (the masked softmax over every held key, the reference
semantics), on random layers and through ``model.generate(..., prefill_chunk_size=...)``.

Tolerance: both paths compute in float32 here (CPU); the flash path sums in another order and merges its parts by
log-sum-exp, so outputs agree to float32 rounding (rtol 1e-5 and atol 1e-5 of the values' scale, ~1); the "hamming"
sketch-space logits ``s_q . s_k / (b T)`` are the general path's ``(1 - 2 h / b) / T`` up to one rounding.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from h1bkv_lite import chunk_attention
from h1bkv_lite.cache import H1BCache, H1BLayer

TOL = dict(rtol=1e-5, atol=1e-5)


def _config(heads: int, kv_heads: int, head_dim: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=head_dim * heads, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _general_path(monkeypatch):
    monkeypatch.setattr(H1BLayer, "_chunk_serves", lambda self, q: False)


def _calls(cache, seed, B, Hq, Hkv, sizes, D=64, device="cpu", dtype=torch.float32):
    """Feed calls of ``sizes`` tokens (the first is the prompt) to layer 0; the outputs of the calls after it."""
    gen = torch.Generator().manual_seed(seed)
    layer, outs = cache.layers[0], []
    for i, n in enumerate(sizes):
        q, k, v = ((torch.randn(B, h, n, D, generator=gen) * 1.5).to(device, dtype) for h in (Hq, Hkv, Hkv))
        layer.update(k, v)
        out = layer.attend(q)
        if i:
            outs.append(out)
    return outs


@pytest.mark.parametrize("score,temperature,heads,window,sink,bits,centered", [
    ("hamming", None, (4, 4), 0, 0, 128, False), ("hamming", 0.2, (8, 2), 5, 0, 64, False),
    ("hamming", None, (9, 3), 3, 2, 256, True), ("asym", None, (4, 2), 0, 0, 128, False),
    ("asym", None, (6, 3), 4, 3, 64, True)])
def test_chunk_path_equals_the_general_path(monkeypatch, score, temperature, heads, window, sink, bits, centered):
    """A prompt, then chunks of 9 and 13 tokens and one decode step: the flash path and the general path give the
    same outputs and leave the same stored state. ``BLOCK_BYTES`` for 7 tokens: the store is read in several
    blocks."""
    seed = _seed()
    Hq, Hkv = heads
    monkeypatch.setattr(chunk_attention, "BLOCK_BYTES", 2 * Hkv * max(bits, 64) * 4 * 7)
    gen = torch.Generator().manual_seed(seed + 1)
    kw = dict(bits=bits, score=score, temperature=temperature, window=window, sink=sink, backend="torch",
              key_mean=torch.randn(1, Hkv, 64, generator=gen) * 0.5 if centered else None)
    sizes = (30, 9, 13, 1)
    fast_cache = H1BCache(_config(Hq, Hkv), **kw)
    used = []
    real = H1BLayer._attend_chunk
    monkeypatch.setattr(H1BLayer, "_attend_chunk", lambda self, q, s: used.append(q.shape[2]) or real(self, q, s))
    fast = _calls(fast_cache, seed, 2, Hq, Hkv, sizes)
    assert used == [9, 13], f"seed={seed}: the flash path ran for calls of {used} tokens"
    _general_path(monkeypatch)
    general_cache = H1BCache(_config(Hq, Hkv), **kw)
    general = _calls(general_cache, seed, 2, Hq, Hkv, sizes)
    for i, (a, b) in enumerate(zip(fast, general)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"seed={seed}, call {i + 1}\n{m}")
    for name, t in fast_cache.layers[0].stored.items():
        assert torch.equal(t, general_cache.layers[0].stored[name]), f"seed={seed}: stored {name} differs"
    assert fast_cache.get_seq_length() == general_cache.get_seq_length() == sum(sizes)


def test_general_path_keeps_what_the_flash_path_does_not_serve(monkeypatch):
    """"cos", a padded batch and a call that starts inside the sinks take the general path (its masked softmax)."""
    used = []
    monkeypatch.setattr(H1BLayer, "_attend_chunk", lambda self, q, s: used.append(q.shape[2]))
    _calls(H1BCache(_config(4, 2), bits=64, score="cos", backend="torch"), _seed(), 1, 4, 2, (20, 6))
    _calls(H1BCache(_config(4, 2), bits=64, sink=8, backend="torch"), _seed(), 1, 4, 2, (5, 6))
    assert used == []


def test_serves_only_what_the_flash_kernels_run(monkeypatch):
    """CPU: any float dtype. CUDA: fp16/bf16, head sizes <= 256 and multiples of 8, and a GPU of compute capability
    8.0 or newer (FlashAttention-2 refuses Volta and Turing): anything else takes the general path."""
    assert chunk_attention.serves(torch.device("cpu"), torch.float32, 64, 128)
    assert not chunk_attention.serves(torch.device("meta"), torch.float16, 64, 128)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for capability, want in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        chunk_attention._cuda_flash_runs.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert chunk_attention.serves(cuda, torch.float16, 128, 128) is (want and torch.version.hip is None)
    assert not chunk_attention.serves(cuda, torch.float32, 128, 128)
    assert not chunk_attention.serves(cuda, torch.bfloat16, 128, 384)  # padded sketch width over 256
    assert not chunk_attention.serves(cuda, torch.bfloat16, 60, 128)
    chunk_attention._cuda_flash_runs.cache_clear()


def test_merge_and_signs():
    """Merging parts by log-sum-exp equals one softmax over all their keys; the +-1 signs are the sketcher's."""
    from h1bkv_lite.sketch import SimHashSketcher

    gen = torch.Generator().manual_seed(_seed())
    logits, v = torch.randn(2, 3, 5, 20, generator=gen) * 3, torch.randn(2, 3, 20, 8, generator=gen)
    parts = [(torch.softmax(logits[..., a:b], -1) @ v[:, :, a:b], torch.logsumexp(logits[..., a:b], -1))
             for a, b in ((0, 4), (4, 13), (13, 20))]
    out, lse = chunk_attention.merge(parts)
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    codes = torch.randint(0, 256, (2, 3, 7, 16), dtype=torch.uint8, generator=gen)
    assert torch.equal(chunk_attention._signs(codes, torch.float16), SimHashSketcher(64, 128).signs(codes).half())


def _tiny_model(seed: int = 0):
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("score", ["hamming", "asym"])
def test_generate_with_prefill_chunks(monkeypatch, score):
    """``model.generate(..., prefill_chunk_size=16)`` with H1BCache: the prompt's later chunks take the flash path,
    and the generated tokens and scores equal the general path's."""
    model = _tiny_model()
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(_seed()))

    def run():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             min_new_tokens=6, past_key_values=H1BCache(model.config, bits=64, score=score,
                                                                        window=8, backend="torch"),
                             prefill_chunk_size=16, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
        return out.sequences, torch.stack(out.scores, dim=1)

    calls = []
    real = H1BLayer._attend_chunk
    monkeypatch.setattr(H1BLayer, "_attend_chunk", lambda self, q, s: calls.append(q.shape[2]) or real(self, q, s))
    tokens, scores = run()
    assert sorted(set(calls)) == [6, 16] and len(calls) == 2 * 4, calls  # 2 layers x chunks 2..5 (16, 16, 16, 6)
    _general_path(monkeypatch)
    ref_tokens, ref_scores = run()
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("score,dtype,heads", [("hamming", torch.float16, (32, 8)), ("asym", torch.float16, (8, 8)),
                                               ("hamming", torch.bfloat16, (12, 4))])
def test_cuda_chunk_path_equals_the_general_path(monkeypatch, score, dtype, heads):
    """On CUDA (flash kernels, head_dim 128, b = 128; a 3000-token prompt, chunks of 700 and 1100 tokens, several
    store blocks): the general path's masked softmax computes in float32 from the same 16-bit inputs, the flash path
    rounds its operands to the inputs' dtype (fp16: ~2**-11 relative; bf16: 2**-8, and ``1 / (b T)`` rounded once
    per head) and accumulates in fp32, so outputs agree to 2**-8 (fp16) / 2**-5 (bf16) of the values' scale
    (~1.5)."""
    seed = _seed()
    Hq, Hkv = heads
    monkeypatch.setattr(chunk_attention, "BLOCK_BYTES", 2 * Hkv * 128 * 2 * 1024)
    kw = dict(bits=128, score=score, window=16, sink=4)
    sizes = (3000, 700, 1100)
    config = _config(Hq, Hkv, head_dim=128)
    fast = _calls(H1BCache(config, **kw), seed, 2, Hq, Hkv, sizes, D=128, device="cuda", dtype=dtype)
    _general_path(monkeypatch)
    general = _calls(H1BCache(config, **kw), seed, 2, Hq, Hkv, sizes, D=128, device="cuda", dtype=dtype)
    tol = 2**-8 if dtype == torch.float16 else 2**-5
    for i, (a, b) in enumerate(zip(fast, general)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1.5,
                                   msg=lambda m: f"seed={seed}, call {i + 1}\n{m}")
