"""eval.py on a tiny random model (char-level toy tokenizer) and, marked slow, on the bundled SmolLM2-135M."""
import functools
import math

import pytest
import torch
from test_cache import VOCAB, tiny_model

from h1bkv_lite import memory
from h1bkv_lite.baselines import EvictionCache, KIVICache
from h1bkv_lite.cache import H1BCache
from h1bkv_lite.eval import (
    decode_perplexity,
    generation_agreement,
    long_context,
    method_name,
    passkey_prompt,
    passkey_retrieval,
    perplexity,
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 40


class CharTokenizer:
    """One token per character (code point mod the tiny vocabulary)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids, **kwargs):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))


def test_fp16_perplexity_is_the_models_cross_entropy(model, windows):
    df = perplexity(model, windows, "fp16", batch_size=2, progress=False)
    assert list(df.columns) == ["method", "window", "tokens", "nll", "ppl"]
    assert df.window.tolist() == [0, 1, 2] and (df.tokens == 39).all() and (df.method == "fp16").all()
    logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").sum(-1)
    assert df.nll.tolist() == pytest.approx(nll.tolist(), rel=1e-5)
    assert df.ppl.tolist() == pytest.approx([math.exp(n / 39) for n in nll.tolist()], rel=1e-5)


def test_lossless_settings_match_fp16_and_compression_costs(model, windows):
    fp16 = perplexity(model, windows, progress=False).nll
    lossless = [functools.partial(H1BCache, bits=16, window=40), functools.partial(KIVICache, group_size=8, residual=40),
                functools.partial(EvictionCache, budget=40)]
    for method in lossless:
        assert perplexity(model, windows, method, progress=False).nll.tolist() == pytest.approx(fp16.tolist(), rel=1e-5)
    h1b = perplexity(model, windows, functools.partial(H1BCache, bits=16), progress=False)
    assert h1b.nll.sum() > fp16.sum()


def test_perplexity_sees_what_decoding_sees(model, windows):
    """The one-forward perplexity equals scoring the window token by token through the cache."""
    method = functools.partial(EvictionCache, budget=8, policy="h2o", sink=1)
    df = perplexity(model, windows[:1], method, progress=False)
    cache = method(model.config)
    logits = torch.cat([model(windows[:1, t:t + 1], past_key_values=cache).logits for t in range(40)], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], windows[0, 1:], reduction="sum")
    assert df.nll[0] == pytest.approx(nll.item(), rel=1e-4)


def test_perplexity_cuts_1d_ids_and_checks_inputs(model):
    df = perplexity(model, torch.arange(100) % VOCAB, seq_len=30, n_windows=5, progress=False)
    assert len(df) == 3 and (df.tokens == 29).all()
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, torch.arange(10), seq_len=30, progress=False)
    with pytest.raises(TypeError, match="method"):
        perplexity(model, torch.arange(100), "h1b", seq_len=30, progress=False)


def test_method_name():
    assert method_name("fp16") == "fp16"
    assert method_name(functools.partial(H1BCache, bits=64, window=16)) == "H1BCache(bits=64, window=16)"
    assert method_name(functools.partial(H1BCache, temperature=torch.ones(2))) == "H1BCache(temperature=tensor)"


def test_passkey_prompt_places_the_needle():
    tok = CharTokenizer()
    filler = tok(FILLER)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        context, question = passkey_prompt(tok, filler, 400, depth, 12345)
        assert len(context) + len(question) == 400
        text = tok.decode(context)
        assert "The pass key is 12345" in text and tok.decode(question).startswith("\nWhat is the pass key?")
    start = tok.decode(passkey_prompt(tok, filler, 400, 0.0, 12345)[0]).index("12345")
    end = tok.decode(passkey_prompt(tok, filler, 400, 1.0, 12345)[0]).index("12345")
    assert start < end
    with pytest.raises(ValueError, match="length"):
        passkey_prompt(tok, filler, 50, 0.5, 12345)


def test_passkey_retrieval_runs_and_lossless_cache_agrees(model):
    tok = CharTokenizer()
    kwargs = dict(lengths=(240, 300), depths=(0.0, 1.0), trials=2, n_new=6, text=FILLER, progress=False)
    fp16 = passkey_retrieval(model, tok, "fp16", **kwargs)
    assert list(fp16.columns) == ["method", "length", "depth", "trial", "passkey", "answer", "correct", "exact"]
    assert len(fp16) == 8 and fp16.passkey.between(10000, 99999).all()
    lossless = passkey_retrieval(model, tok, functools.partial(H1BCache, bits=16, window=400), **kwargs)
    assert lossless.answer.tolist() == fp16.answer.tolist() and lossless.passkey.tolist() == fp16.passkey.tolist()


def test_long_context_pools_decode_perplexity_and_passkey_accuracy(model):
    tok, method = CharTokenizer(), functools.partial(H1BCache, bits=32, window=4)
    got = long_context(model, tok, method, prefill=30, decode=5, windows=2, passkey_lengths=(240, 300),
                       passkey_depths=(0.0, 1.0), passkey_trials=2, text=FILLER, progress=False)
    df = decode_perplexity(model, tok, method, prefill=30, decode=5, n_windows=2, text=FILLER, progress=False)
    keys = passkey_retrieval(model, tok, method, lengths=(240, 300), depths=(0.0, 1.0), trials=2, n_new=8,
                             text=FILLER, progress=False)
    assert got["decode_ppl"] == pytest.approx(math.exp(df.nll.sum() / df.tokens.sum()), rel=1e-9)
    assert (got["decode_prefill"], got["decode_tokens"], got["passkey_trials"]) == (30, 10, 8)
    assert got["passkey"] == {"240": keys[keys.length == 240].exact.mean(), "300": keys[keys.length == 300].exact.mean()}
    assert long_context(model, tok, method, windows=0, passkey_lengths=(), progress=False) == {}


def test_generation_agreement(model):
    prompts = [[5, 6, 7, 8, 9, 10], torch.arange(20, 32)]
    exact = generation_agreement(model, None, "fp16", prompts, n_new=8, progress=False)
    assert (exact.match_rate == 1.0).all() and (exact.first_mismatch == 8).all()
    assert (exact.teacher_forced_match == 1.0).all() and exact.prompt_tokens.tolist() == [6, 12]
    lossless = generation_agreement(model, None, functools.partial(KIVICache, group_size=8, residual=40), prompts,
                                    n_new=8, progress=False)
    assert (lossless.match_rate == 1.0).all()
    lossy = generation_agreement(model, None, functools.partial(H1BCache, bits=16), prompts, n_new=8, progress=False)
    assert lossy.match_rate.between(0, 1).all() and (lossy.first_mismatch <= 8).all()
    assert (lossy.match_rate < 1).any()


@pytest.mark.slow
def test_real_model_smoke(model_and_tokenizer):
    """SmolLM2-135M: FP16 perplexity is sane, a lossless H1B window matches it, b=64 costs, generate works."""
    model, tokenizer = model_and_tokenizer
    from h1bkv_lite.data import load_corpus, token_batches

    ids = token_batches(tokenizer, load_corpus(split="validation"), 128, 1)
    fp16 = perplexity(model, ids, progress=False).ppl[0]
    assert 3 < fp16 < 100
    lossless = perplexity(model, ids, functools.partial(H1BCache, bits=64, window=128), progress=False).ppl[0]
    assert lossless == pytest.approx(fp16, rel=1e-3)
    h1b = perplexity(model, ids, functools.partial(H1BCache, bits=64, score="cos", window=16), progress=False).ppl[0]
    assert h1b > fp16
    cache = H1BCache(model.config, bits=256, window=8)
    prompt = tokenizer("Emma Woodhouse, handsome, clever, and rich,", return_tensors="pt")
    out = model.generate(**prompt, past_key_values=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 6
    parts = cache.nbytes_by_part()
    predicted = memory.kv_cache_bytes(model.config, cache.get_seq_length(), 1, cache.scheme).parts
    assert parts.pop("window") == 2 * predicted.pop("window")  # the exact window is float32 here, not fp16
    assert parts == predicted
