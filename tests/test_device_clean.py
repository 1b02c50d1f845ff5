"""Device and dtype cleanliness of what the notebooks call, checked on CPU.

A GPU run fails where host tensors (``torch.arange(T)``, ``torch.tensor(...)`` without a device) meet the
model's tensors, or where a device tensor goes to ``.numpy()``. ``device_check.PretendDevice`` tags the inputs
as "on the device" and raises on exactly those mixes, so these tests find such bugs without a GPU; the
results must equal the untagged run's. The dtype tests feed float16 / bfloat16 inputs (the library refuses float64), which catch the same
kind of bug for dtypes (a hard-coded float32 meeting the inputs' dtype).
"""
import pandas as pd
import pytest
import torch

from device_check import DeviceMix, PretendDevice
from h1bkv_lite import SimHashSketcher
from h1bkv_lite.analysis import (
    angle_estimates, attention_fidelity, exact_attention, fidelity_sweep, fit_temperature, head_stats,
    kl_divergence, pairs_from_capture, temperature_kl_curve,
)
from h1bkv_lite.analysis.values import (
    attention_output_errors, channel_stats, quantization_grid, reconstruction_errors, relative_errors,
)


def _capture(layers=(0, 2), B=1, Hq=4, Hkv=2, T=24, D=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {l: (torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64).to(dtype)) for l in layers}


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


# ------------------------------------------------------------------------------------------------ the checker itself
def test_checker_catches_a_host_mask_and_numpy_of_a_device_tensor():
    x = torch.randn(5, 5)
    with PretendDevice() as dev:
        x = dev.put(x)
        with pytest.raises(DeviceMix, match="masked_fill"):
            x.masked_fill(torch.arange(5).unsqueeze(0) > torch.arange(5).unsqueeze(1), 0.0)
        x.masked_fill(torch.arange(5, device=x.device).unsqueeze(0) > 2, 0.0)  # made on the input's device: fine
        with pytest.raises(DeviceMix, match="numpy"):
            (x * 2).numpy()
        (x * 2).cpu().numpy()
        x[torch.tensor([0, 2])]  # a host index into a device tensor is fine on CUDA too
        with pytest.raises(DeviceMix):
            x + torch.ones(5)
        x + torch.tensor(2.0)  # a 0-dim host tensor is fine on CUDA too


# ------------------------------------------------------------------------------------------------ notebook 02: fidelity
def test_fidelity_sweep_and_head_stats_are_device_clean():
    cap, calib = _capture(), _capture(seed=1)
    want = fidelity_sweep(cap, [16, 32], ["hamming", "hamming_std", "cos", "asym", "exact"], calib_capture=calib,
                          topk=(4, 8))
    want_heads = head_stats(cap)
    with PretendDevice() as dev:
        got = fidelity_sweep(dev.put(_capture()), [16, 32], ["hamming", "hamming_std", "cos", "asym", "exact"],
                             calib_capture=dev.put(_capture(seed=1)), topk=(4, 8))
        got_heads = head_stats(dev.put(_capture()))
    _frames_equal(got, want)
    _frames_equal(got_heads, want_heads)


def test_attention_fidelity_maps_and_temperature_curve_are_device_clean():
    q, k, v = _capture()[0]
    sk = SimHashSketcher(16, 32, seed=0)
    want = attention_fidelity(q, k, v, sketcher=sk, return_maps=True, exact=exact_attention(q, k, v), topk=(4,))
    want_fit = fit_temperature(q, k, sketcher=sk)
    want_curve = temperature_kl_curve(q, k, sketcher=sk, temperatures=torch.tensor([[0.5], [1.0]]) * want_fit)
    with PretendDevice() as dev:
        q, k, v = dev.put(_capture()[0])
        sk = SimHashSketcher(16, 32, seed=0)
        got = attention_fidelity(q, k, v, sketcher=sk, return_maps=True, exact=exact_attention(q, k, v), topk=(4,))
        fit = fit_temperature(q, k, sketcher=sk)
        assert dev.on_device(fit)  # results stay on the inputs' device until a caller moves them
        curve = temperature_kl_curve(q, k, sketcher=sk, temperatures=torch.tensor([[0.5], [1.0]]) * fit.cpu())
        row_kl = kl_divergence(got["probs_exact"][0, 0], got["probs"][0, 0])
    for key in want:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)
    torch.testing.assert_close(fit, want_fit)
    torch.testing.assert_close(curve, want_curve)
    torch.testing.assert_close(row_kl, kl_divergence(want["probs_exact"][0, 0], want["probs"][0, 0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fidelity_sweep_takes_float16_and_bfloat16_captures(dtype):
    got = fidelity_sweep(_capture(dtype=dtype), [16], ["hamming", "hamming_std", "cos", "asym", "exact"],
                         calib_capture=_capture(seed=1, dtype=dtype), topk=(4,))
    want = fidelity_sweep(_capture(dtype=dtype), [16], ["hamming", "hamming_std", "cos", "asym", "exact"],
                          calib_capture={l: tuple(t.float() for t in e) for l, e in _capture(seed=1, dtype=dtype).items()},
                          topk=(4,))
    assert got[["kl", "spearman", "out_rel_err"]].notna().all().all()
    _frames_equal(got, want)  # the metrics are computed in float32 whatever the capture's dtype
    head_stats(_capture(dtype=dtype))


# ------------------------------------------------------------------------------------------------ notebook 01: LSH
def test_pairs_and_angle_estimates_are_device_clean():
    cap = _capture(layers=(0, 1), T=40)
    qw, kw, metaw = pairs_from_capture(cap, 50, 0)
    groups = (metaw.layer * 2 + metaw.kv_head).to_numpy()
    want = angle_estimates(qw, kw, [16, 64], 0, groups=groups)
    with PretendDevice() as dev:
        q, k, meta = pairs_from_capture(dev.put(_capture(layers=(0, 1), T=40)), 50, 0)
        assert dev.on_device(q) and dev.on_device(k)
        got = angle_estimates(q, k, [16, 64], 0, groups=groups)
    _frames_equal(meta, metaw)
    _frames_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_angle_estimates_take_float16_and_bfloat16(dtype):
    q, k, _ = pairs_from_capture(_capture(layers=(0,), T=40, dtype=dtype), 50, 0)
    df = angle_estimates(q, k, [16, 64], 0)
    assert len(df) == 100 and df[["theta", "theta_hat", "asym_rel"]].notna().all().all()


# ------------------------------------------------------------------------------------------------ notebook 03: values
def test_value_analysis_is_device_clean():
    cap = _capture(layers=(0, 3), B=2, T=20)
    values = {l: e[2] for l, e in cap.items()}
    want = (channel_stats(values), reconstruction_errors(values, [2, 4], [None, 8], max_vectors=30),
            attention_output_errors(cap, [2, 4], [None, 8]), quantization_grid(values[0][0, 0, 0], 4, 8))
    want_rel = relative_errors(values[0], 4, 8)
    with PretendDevice() as dev:
        cap = dev.put(_capture(layers=(0, 3), B=2, T=20))
        values = {l: e[2] for l, e in cap.items()}
        got = (channel_stats(values), reconstruction_errors(values, [2, 4], [None, 8], max_vectors=30),
               attention_output_errors(cap, [2, 4], [None, 8]), quantization_grid(values[0][0, 0, 0], 4, 8))
        rel = relative_errors(values[0], 4, 8)
    for a, b in zip(got, want):
        _frames_equal(a, b)
    torch.testing.assert_close(rel, want_rel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_value_analysis_takes_float16_and_bfloat16(dtype):
    cap = _capture(layers=(0,), B=1, T=20, dtype=dtype)
    values = {l: e[2] for l, e in cap.items()}
    assert channel_stats(values).notna().all().all()
    assert reconstruction_errors(values, [4], [None, 8]).rel_error.notna().all()
    assert attention_output_errors(cap, [4], [None, 8])["mean"].notna().all()


# ------------------------------------------------------------------------------------------------ capture: a model's tensors
def _tiny_llama(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_the_model_device_feeds_the_analysis_device_clean(dtype):
    """A model "on the device" (parameters and buffers tagged), host token ids: the capture stays on the model's
    device with device=None and every notebook-02/03 analysis runs on it without a host tensor."""
    from h1bkv_lite.capture import capture_attention_inputs

    model = _tiny_llama(dtype)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    want = capture_attention_inputs(model, ids, layers=[0, 2])  # default: float32 copies on the host
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for e in want.values() for t in e)
    with PretendDevice() as dev:
        dev.put(list(model.parameters()) + list(model.buffers()))
        cap = capture_attention_inputs(model, ids, layers=[0, 2], device=None)
        assert all(dev.on_device(t) and t.dtype == torch.float32 for e in cap.values() for t in e)
        host = capture_attention_inputs(model, ids, layers=[0, 2])
        assert not any(dev.on_device(t) for e in host.values() for t in e)
        sweep = fidelity_sweep(cap, [16], ["hamming", "cos"], calib_capture=cap, topk=(4,))
        errors = attention_output_errors(cap, [4], [None])
    for layer in want:
        for a, b in zip(cap[layer], want[layer]):
            torch.testing.assert_close(a, b)
    assert sweep.kl.notna().all() and errors["mean"].notna().all()


# ------------------------------------------------------------------------------------------------ notebook 06: eval, finetune
def test_notebook_06_calls_are_device_clean(tmp_path):
    """perplexity (fp16 and H1B), cache.fit_temperature with host token ids (it did not move them to the model's
    device: found by this test), and the finetuner's train / perplexity / checkpoint reload, all on a model
    "on the device"."""
    import functools

    from h1bkv_lite.cache import H1BCache, fit_temperature
    from h1bkv_lite.eval import perplexity
    from h1bkv_lite.finetune import FinetuneConfig, H1BFinetuner

    model = _tiny_llama()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "c.pt"
    with PretendDevice() as dev:
        dev.put(list(model.parameters()) + list(model.buffers()))
        perplexity(model, ids, "fp16", batch_size=2, progress=False)
        T = fit_temperature(model, ids[:2], bits=32)
        assert dev.on_device(T) and not T.requires_grad
        perplexity(model, ids, functools.partial(H1BCache, bits=32, temperature=T.cpu() * 2), batch_size=2,
                   progress=False)
        for recipe in ["paper", "lora"]:
            ft = H1BFinetuner(model, FinetuneConfig(recipe=recipe, bits=32, batch_size=2, seed=0), temperature=T)
            ft.train(ids, 2, eval_ids=ids[:2], eval_every=1, eval_batch_size=2, checkpoint=ckpt, progress=False)
            ft.perplexity(ids[:2], exact=True, batch_size=2)
            assert not dev.on_device(ft.temperatures())  # host: the notebook plots it
            ft.temperature_history()
            ft.restore()
        reloaded = H1BFinetuner.from_checkpoint(model, ckpt)
        reloaded.perplexity(ids[:2], batch_size=2)
        reloaded.restore()


# ------------------------------------------------------------------------------------------------ notebook 05: baselines
def test_calibrate_loki_takes_host_token_ids():
    """Notebook 05 passes host token ids to ``calibrate_loki`` (found on an H200: it did not move them to the
    model's device); the basis is the untagged run's."""
    from h1bkv_lite.baselines import calibrate_loki

    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = calibrate_loki(model, ids, mask)
    with PretendDevice() as dev:
        dev.put(list(model.parameters()) + list(model.buffers()))
        got = calibrate_loki(model, ids, mask)
        assert dev.on_device(got)
    torch.testing.assert_close(got, want)
