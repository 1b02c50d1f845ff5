"""The peers module: its availability report (in every environment), its byte formula and stepwise perplexity
(no peer package needed), and -- tests marked ``peers``, skipped with the reason when the [peers] extra is not
installed -- transformers' QuantizedCache with the quanto and hqq backends in generate() on a tiny random
Llama, its bytes measured from its tensors equal to the layout's count.

Run the marked ones with the extra installed: ``make test-peers`` (or ``pytest -m peers tests/test_peers.py``
in an environment with ``pip install -e '.[peers]'``)."""
import importlib.metadata
import subprocess
import sys

import pandas as pd
import pytest
import torch
from test_cache import VOCAB, greedy, tiny_model
from transformers import DynamicCache

from h1bkv_lite import peers as P
from h1bkv_lite.eval import perplexity

PAIRS = [(b, n) for b in P.BACKENDS for n in (2, 4)]


def needs(backend):
    reason = P.unavailable_reason(backend)
    return pytest.mark.skipif(reason is not None, reason=f"[peers] extra: {reason}")


# ------------------------------------------------------------------------------------------------ any environment
def test_status_lists_every_peer_and_says_why_one_is_missing():
    status = P.peer_status()
    assert list(status.columns) == ["peer", "package", "version", "available", "reason"]
    assert list(status.package) == ["optimum-quanto", "hqq", "kvpress"]
    for r in status.itertuples():
        assert r.available == (r.reason == "")
    kvpress = status.set_index("package").loc["kvpress"]
    assert not kvpress.available and "transformers" in kvpress.reason and "5.3" in kvpress.reason
    for backend, dist in (("quanto", "optimum-quanto"), ("hqq", "hqq")):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            reason = P.unavailable_reason(backend)
            assert reason == f"{dist} is not installed ({P.INSTALL_HINT})" and "[peers]" in reason


@pytest.mark.parametrize("backend,dist", [("quanto", "optimum-quanto"), ("hqq", "hqq")])
def test_missing_or_old_package_is_reported_not_raised(monkeypatch, backend, dist):
    real = importlib.metadata.version

    def missing(name):
        if name == dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    reason = P.unavailable_reason(backend)
    assert "not installed" in reason and "[peers]" in reason
    with pytest.raises(RuntimeError, match="not installed"):
        P.QuantizedPeer(backend, 4).cache(tiny_model().config)
    assert not P.peer_status().set_index("package").loc[dist].available
    if backend == "quanto":
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.2.4" if name == dist else real(name))
        assert "older than 0.2.5" in P.unavailable_reason("quanto")


def test_importing_the_module_imports_no_peer_package():
    code = ("import sys, h1bkv_lite.peers; print(any(m.split('.')[0] in ('hqq', 'kvpress') "
            "or m.startswith('optimum.quanto') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_peer_fields_and_validation():
    peers = P.build_peers()
    assert [p.name for p in peers] == ["HF quanto-2", "HF quanto-4", "HF hqq-2", "HF hqq-4"]
    assert peers[0].params == {"family": "hf-quanto", "backend": "quanto", "nbits": 2, "q_group_size": 64,
                               "residual_length": 128, "axis_key": 0, "axis_value": 0}
    with pytest.raises(ValueError, match="backend"):
        P.QuantizedPeer("fp8", 4)
    with pytest.raises(ValueError, match="nbits"):
        P.QuantizedPeer("hqq", 3)


def test_residual_tokens_follow_the_flush_rule():
    # one token quantized at the first update, then the residual is flushed when it would reach R
    assert [P.residual_tokens(n, 4) for n in range(1, 11)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert P.residual_tokens(256, 128) == 127 and P.residual_tokens(512, 128) == 127
    assert P.residual_tokens(20, 128, prefill=20) == 0 and P.residual_tokens(25, 128, prefill=20) == 5
    with pytest.raises(ValueError, match="prefill"):
        P.residual_tokens(5, 4, prefill=6)


def test_predicted_bytes_by_hand():
    config = tiny_model().config  # 2 layers, 2 kv heads, head_dim 32: 64 elements per token per layer for K
    # 10 tokens decoded one at a time, R = 4 -> 9 quantized (576 elements = 9 groups of 64), 1 residual;
    # hqq packs within each group (64 * 4 / 8 bytes), quanto across groups (ceil(9 * 4 / 8) = 5 rows of 64)
    peer = P.QuantizedPeer("hqq", 4, residual_length=4)
    got = P.predicted_nbytes(config, 10, peer)
    assert got == {"quantized": 2 * 2 * (9 * 32 + 2 * 9 * 2), "residual": 2 * 2 * 1 * 64 * 2}
    quanto4 = P.predicted_nbytes(config, 10, P.QuantizedPeer("quanto", 4, residual_length=4))
    assert quanto4 == {"quantized": 2 * 2 * (5 * 64 + 2 * 9 * 2), "residual": got["residual"]}
    quanto2 = P.predicted_nbytes(config, 10, P.QuantizedPeer("quanto", 2, residual_length=4))
    assert quanto2["quantized"] == 2 * 2 * (3 * 64 + 2 * 9 * 2)  # ceil(9 groups * 2 bits / 8) = 3 rows of 64
    assert P.predicted_nbytes(config, 10, peer, float_bytes=4)["residual"] == 2 * got["residual"]


def test_stepwise_perplexity_of_an_exact_cache_is_the_one_forward_perplexity():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    df, caches = P.stepwise_perplexity(model, ids, lambda config: DynamicCache(config=config))
    ref = perplexity(model, ids, "fp16", progress=False)
    assert df.nll.to_numpy() == pytest.approx(ref.nll.to_numpy(), rel=1e-4)
    assert [c.get_seq_length() for c in caches] == [24, 24]


def test_compare_with_ours_pairs_each_peer_with_kivi_at_its_bits():
    ours = pd.DataFrame({"name": ["FP16", "KIVI-2", "KIVI-4"], "family": ["fp16", "kivi", "kivi"],
                         "bits": [None, 2, 4], "ppl": [10.0, 20.0, 11.0], "bytes_per_token": [100.0, 30.0, 40.0]})
    theirs = pd.DataFrame({"name": ["HF hqq-4"], "nbits": [4], "ppl": [12.1], "bytes_per_token": [60.0]})
    r = P.compare_with_ours(ours, theirs).iloc[0]
    assert (r.peer, r.ours) == ("HF hqq-4", "KIVI-4")
    assert r.ppl_ratio == pytest.approx(1.1) and r.bytes_ratio == pytest.approx(1.5)
    assert r.peer_vs_fp16 == pytest.approx(1.21) and r.ours_vs_fp16 == pytest.approx(1.1)
    with pytest.raises(ValueError, match="FP16"):
        P.compare_with_ours(ours[ours.family != "fp16"], theirs)


# ------------------------------------------------------------------------------------------------ with the extra
@pytest.mark.peers
@pytest.mark.parametrize("backend,nbits", [pytest.param(b, n, marks=needs(b)) for b, n in PAIRS])
def test_quantized_cache_generates_and_its_bytes_are_its_tensors(backend, nbits):
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    peer = P.QuantizedPeer(backend, nbits, residual_length=8)
    cache = peer.cache(model.config)
    tokens, scores = greedy(model, prompt, cache, n_new=12)
    assert tokens.shape == (1, 12) and not torch.isnan(scores).any()  # -inf: min_new_tokens masks EOS
    # the prompt (20) is quantized at once, then 11 decode steps fed (the 12th token is not fed back): 11 mod 8
    n = cache.get_seq_length()
    assert n == 31 and P.residual_tokens(n, 8, prefill=20) == 3
    assert all(layer.keys.shape[-2] == 3 for layer in cache.layers)
    assert P.cache_nbytes(cache, float_bytes=None) == P.predicted_nbytes(model.config, n, peer, prefill=20,
                                                                         float_bytes=4)  # an fp32 model
    assert P.cache_nbytes(cache) == P.predicted_nbytes(model.config, n, peer, prefill=20)
    ref_tokens, _ = greedy(model, prompt, DynamicCache(config=model.config), n_new=12)
    assert tokens[0, 0] == ref_tokens[0, 0]  # the first token comes from the prompt's exact forward


@pytest.mark.peers
@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs(b)) for b in P.BACKENDS])
def test_run_peers_measures_what_it_predicts(backend):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    peers = [P.QuantizedPeer(backend, 2, residual_length=16), P.QuantizedPeer(backend, 4, residual_length=16)]
    df = P.run_peers(model, ids, peers, log=None)
    assert list(df.name) == [p.name for p in peers]
    assert (df.bytes_per_token == df.predicted_bytes_per_token).all()
    assert (df.bits_per_element < 16).all() and (df.tokens == 2 * 39).all()
    assert df.bytes_per_token.iloc[0] < df.bytes_per_token.iloc[1]  # 2-bit codes are smaller
    fp16 = perplexity(model, ids, "fp16", progress=False)
    fp16_ppl = float(torch.tensor(fp16.nll.sum() / fp16.tokens.sum()).exp())
    assert (df.ppl > 0.5 * fp16_ppl).all() and (df.ppl < 5 * fp16_ppl).all()
