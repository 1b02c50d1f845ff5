"""Drop-in across model families: tiny random configs of ten families through generate() with every cache.

With settings that keep everything exact, each cache must give DynamicCache's logits; compressing, it must
run and bill exactly what :func:`memory.kv_cache_bytes` predicts. A family whose attention needs a feature
the caches do not implement (gpt-oss's attention sinks, Gemma 2's logit softcapping) is refused by name.
Sliding-window families (Mistral, Qwen2 with use_sliding_window, Gemma 2 / 3's interleaved local layers) run
with an 8-token window and a 10 + 12 token sequence, so the prompt and the decode steps outgrow the window.
"""
import functools

import pytest
import torch
import transformers as tf

from h1bkv_lite import H1BCache, memory
from h1bkv_lite.baselines import EvictionCache, FP16Cache, KIVICache, LokiCache, calibrate_loki

VOCAB, PROMPT, NEW = 128, 10, 6
WINDOW, SLIDING_NEW = 8, 12  # sliding families: the 10-token prompt and 22-token sequence outgrow the window
MIXED = ["sliding_attention", "full_attention"]
SUPPORTED = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
             "gemma3": tf.Gemma3TextConfig, "phi3": tf.Phi3Config, "granite": tf.GraniteConfig,
             "olmo2": tf.Olmo2Config}
SLIDING = {  # family -> (config class, config extras); the windows DynamicCache(config=...) gives each layer
    "mistral_sliding": (tf.MistralConfig, dict(sliding_window=WINDOW)),  # every layer sliding
    "qwen2_sliding": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma2_local": (tf.Gemma2Config, dict(sliding_window=WINDOW, attn_logit_softcapping=None, attn="eager")),
    "gemma3_local": (tf.Gemma3TextConfig, dict(sliding_window=WINDOW, layer_types=MIXED)),
    "phi3_sliding": (tf.Phi3Config, dict(sliding_window=WINDOW)),
}
REFUSED = {"gpt_oss": (tf.GptOssConfig, "attention sinks"), "gemma2": (tf.Gemma2Config, "softcapping")}


def family_model(config_class, attn="sdpa", **extra):
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def scores(model, cache, new=NEW):
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return torch.stack(out.scores, dim=1)


def caches(model):
    """name -> (exact-everywhere factory, compressing factory)."""
    P = functools.partial
    basis = calibrate_loki(model, torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)))
    return {
        "h1b": (P(H1BCache, bits=32, window=100), P(H1BCache, bits=32, window=2, sink=1)),
        "kivi": (P(KIVICache, bits=2, group_size=4, residual=100), P(KIVICache, bits=2, group_size=4, residual=4)),
        "h2o": (P(EvictionCache, budget=100), P(EvictionCache, budget=8, sink=2)),
        "loki": (P(LokiCache, rank=4, top_k=100, basis=basis), P(LokiCache, rank=4, top_k=4, basis=basis)),
        "fp16": (FP16Cache, FP16Cache),
    }


@pytest.mark.parametrize("family", list(SUPPORTED) + list(SLIDING))
def test_every_cache_is_drop_in_for_the_family(family):
    config_class, extra = SLIDING[family] if family in SLIDING else (SUPPORTED[family], {})
    new = SLIDING_NEW if family in SLIDING else NEW
    model = family_model(config_class, **extra)
    attn = model.config._attn_implementation
    dynamic = tf.DynamicCache(config=model.config)
    ref = scores(model, dynamic, new)
    sliding = [layer.is_sliding for layer in dynamic.layers]
    assert any(sliding) or family not in SLIDING, sliding  # (Mistral and Gemma 3 default to 4096-token windows)
    for name, (exact, compressing) in caches(model).items():
        cache = exact(model.config)
        torch.testing.assert_close(scores(model, cache, new), ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{family}/{name}: {m}")
        assert [layer.is_sliding for layer in cache.layers] == sliding, f"{family}/{name}"
        held = memory.kv_cache_bytes(model.config, cache.get_seq_length(), 1, cache.scheme, exact_bytes=4)
        assert cache.nbytes() == held.total, f"{family}/{name}"  # a sliding layer holds its window only
        cache = compressing(model.config)
        got = scores(model, cache, new)
        assert got.shape == ref.shape and not bool(got.isnan().any()), f"{family}/{name}"  # EOS is -inf (min_new_tokens)
        predicted = memory.kv_cache_bytes(model.config, cache.get_seq_length(), 1, cache.scheme, exact_bytes=4)
        assert cache.nbytes() == predicted.total, f"{family}/{name}"
        assert cache.nbytes_by_part() == {p: b for p, b in predicted.parts.items()}, f"{family}/{name}"
        assert model.config._attn_implementation == attn


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_needing_unimplemented_attention_features_are_refused_by_name(family):
    config_class, feature = REFUSED[family]
    extra = dict(num_local_experts=2, num_experts_per_tok=1) if family == "gpt_oss" else {}
    model = family_model(config_class, attn="eager", **extra)
    scores(model, tf.DynamicCache(config=model.config))  # the family itself runs
    with pytest.raises(NotImplementedError, match=feature):
        scores(model, H1BCache(model.config, bits=32, window=100))
    assert model.config._attn_implementation == "eager"


def test_crop_of_exact_tokens_is_an_exact_rollback_and_compressed_ones_are_dropped():
    """Dropping exact tokens leaves the cache as if they had never come; rolling back into the compressed
    part drops those tokens from the store (they cannot come back exact, so the window refills later)."""
    model = family_model(tf.LlamaConfig)
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(2))
    rolled, straight = (H1BCache(model.config, bits=32, window=100, sink=1) for _ in range(2))
    model(ids[:, :10], past_key_values=rolled)
    model(ids[:, 10:13], past_key_values=rolled)  # three tokens, two of them rejected
    rolled.crop(-2)
    model(ids[:, :11], past_key_values=straight)
    assert rolled.get_seq_length() == straight.get_seq_length() == 11
    torch.testing.assert_close(model(ids[:, 13:14], past_key_values=rolled).logits,
                               model(ids[:, 13:14], past_key_values=straight).logits)
    compressed = H1BCache(model.config, bits=32, window=2, sink=1)
    model(ids[:, :12], past_key_values=compressed)
    assert compressed.layers[0].n_compressed == 9
    compressed.crop(-4)  # the 2-token window, then 2 compressed tokens
    layer = compressed.layers[0]
    assert (layer.n_compressed, layer.recent_k.shape[2], compressed.get_seq_length()) == (7, 0, 8)
    assert layer.stored["key_codes"].shape[2] == 7 and layer.stored["values"].shape[2] == 7
    logits = model(ids[:, 12:13], past_key_values=compressed).logits
    assert bool(logits.isfinite().all()) and compressed.get_seq_length() == 9


@pytest.mark.parametrize("name", ["h1b", "kivi", "h2o", "loki", "fp16"])
def test_assisted_decoding_runs_and_is_exact_with_exact_settings(name):
    """Prompt-lookup (speculative) decoding rolls rejected tokens back with crop(): with settings that keep
    everything exact, the tokens equal DynamicCache's greedy ones; compressing, it runs."""
    model = family_model(tf.LlamaConfig)
    ids = torch.randint(3, 20, (1, 24), generator=torch.Generator().manual_seed(3))  # repetitive: lookups hit
    settings = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3, pad_token_id=0)
    ref = model.generate(ids, past_key_values=tf.DynamicCache(config=model.config), **settings)
    exact, compressing = caches(model)[name]
    assert torch.equal(model.generate(ids, past_key_values=exact(model.config), **settings), ref)
    if name == "kivi":  # keys quantized per group: a rollback into a group is refused by name
        compressing = functools.partial(KIVICache, bits=2, group_size=4, residual=8)
    out = model.generate(ids, past_key_values=compressing(model.config), **settings)
    assert out.shape == ref.shape


def test_rollbacks_a_format_cannot_make_are_refused():
    model = family_model(tf.LlamaConfig)
    ids = torch.randint(3, VOCAB, (1, 12))
    kivi = KIVICache(model.config, bits=2, group_size=4, residual=2)
    model(ids, past_key_values=kivi)
    with pytest.raises(NotImplementedError, match="group"):
        kivi.crop(-6)  # the 4 exact residual tokens, then 2 of a 4-token key group
    h2o = EvictionCache(model.config, budget=8, sink=2)
    model(ids, past_key_values=h2o)
    with pytest.raises(NotImplementedError, match="recent window"):
        h2o.crop(-5)


# ------------------------------------------------------------------------------------------------ sliding windows
def sliding_model(**extra):
    return family_model(tf.MistralConfig, sliding_window=WINDOW, **extra)


def test_sliding_layers_store_only_their_window_in_every_part():
    """Past the window a sliding layer holds W - 1 tokens at rest: sinks go first, then compressed tokens,
    then exact ones; the compressed store only advances its start (no copy)."""
    model = sliding_model()
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = H1BCache(model.config, bits=32, window=2, sink=1)
    model(ids[:, :5], past_key_values=cache)
    layer = cache.layers[0]
    assert (layer.sink_k.shape[2], layer.held_compressed, layer.recent_k.shape[2], layer.window_start) == (1, 2, 2, 0)
    model(ids[:, 5:12], past_key_values=cache)  # 12 tokens: positions 5..11 held
    prompt = H1BCache(model.config, bits=32, window=2)
    model(ids[:, :12], past_key_values=prompt)  # a prompt longer than the window is not mistaken for padding
    full_model = family_model(tf.MistralConfig, sliding_window=None)
    full = H1BCache(full_model.config, bits=32, window=2)
    full_model(ids[:, :12], past_key_values=full)
    assert not prompt.layers[0]._padded
    torch.testing.assert_close(prompt.layers[0].calibrated, full.layers[0].calibrated)  # same q/k in layer 0
    assert (layer.sink_k.shape[2], layer.held_compressed, layer.recent_k.shape[2], layer.window_start) == (0, 5, 2, 5)
    buffer = layer.store._buffers["key_codes"]
    for t in range(12, 30):
        model(ids[:, t:t + 1], past_key_values=cache)
        assert layer.held_compressed == WINDOW - 1 - 2 and layer.window_start == t + 2 - WINDOW
        assert layer.store._buffers["key_codes"] is buffer
    assert cache.get_seq_length() == 30 and cache.layers[0].get_mask_sizes(1) == (WINDOW, 30 - WINDOW + 1)
    predicted = memory.kv_cache_bytes(model.config, 30, 1, cache.scheme, exact_bytes=4)
    assert cache.nbytes_by_part() == predicted.parts and predicted.total < memory.kv_cache_bytes(
        family_model(tf.MistralConfig, sliding_window=None).config, 30, 1, cache.scheme, exact_bytes=4).total


@pytest.mark.parametrize("name", ["h1b", "kivi", "h2o", "loki", "fp16"])
def test_sliding_left_padded_batch_and_compressed_prefill(name):
    """A left-padded batch through sliding layers equals DynamicCache's (exact settings); compressing with
    compressed_prefill=True runs and bills what memory predicts."""
    model = sliding_model()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0)
    ref = torch.stack(model.generate(ids, past_key_values=tf.DynamicCache(config=model.config), **settings).scores, 1)
    exact, compressing = caches(model)[name]
    got = torch.stack(model.generate(ids, past_key_values=exact(model.config), **settings).scores, 1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if name == "fp16":
        return
    cache = compressing.func(model.config, **compressing.keywords, compressed_prefill=True)
    assert torch.stack(model.generate(ids[:1], past_key_values=cache, max_new_tokens=10, min_new_tokens=10,
                                      do_sample=False, output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=0).scores, 1).isnan().sum() == 0
    assert cache.nbytes() == memory.kv_cache_bytes(model.config, cache.get_seq_length(), 1, cache.scheme,
                                                   exact_bytes=4).total


def test_sliding_crop_mirrors_dynamic_sliding_window_layer():
    """Before the window is full a rollback is exact; after it, tokens the shortened window needs are gone,
    so crop raises (as DynamicSlidingWindowLayer does) -- unless past recording was activated, which keeps
    them until the crop and then drops what the window no longer sees."""
    model = sliding_model()
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
    early, straight = (H1BCache(model.config, bits=32, window=100) for _ in range(2))
    model(ids[:, :4], past_key_values=early)
    model(ids[:, 4:7], past_key_values=early)
    early.crop(-2)
    model(ids[:, :5], past_key_values=straight)
    torch.testing.assert_close(model(ids[:, 7:8], past_key_values=early).logits,
                               model(ids[:, 7:8], past_key_values=straight).logits)
    full = H1BCache(model.config, bits=32, window=100)
    model(ids[:, :12], past_key_values=full)
    with pytest.raises(RuntimeError, match="sliding-window layer 0 .*activate_past_recording"):
        full.crop(-2)
    for make in (lambda c: H1BCache(c, bits=32, window=100),
                 lambda c: KIVICache(c, bits=2, group_size=4, residual=8), lambda c: EvictionCache(c, budget=100),
                 lambda c: LokiCache(c, rank=4, top_k=100, basis=torch.eye(16).expand(2, 2, 16, 16))):
        recorded, straight = make(model.config), make(model.config)
        recorded.activate_past_recording()
        model(ids[:, :12], past_key_values=recorded)
        model(ids[:, 12:15], past_key_values=recorded)
        recorded.crop(-2)  # 13 tokens left; the window of the next one needs positions 6..13
        assert recorded.layers[0].window_start == 13 - WINDOW + 1 or isinstance(recorded, (KIVICache, EvictionCache))
        model(ids[:, :13], past_key_values=straight)
        torch.testing.assert_close(model(ids[:, 15:16], past_key_values=recorded).logits,
                                   model(ids[:, 15:16], past_key_values=straight).logits, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=type(recorded).__name__: f"{name}: {m}")


@pytest.mark.parametrize("name", ["h1b", "kivi", "h2o", "loki", "fp16"])
def test_sliding_assisted_decoding_matches_dynamic_cache(name):
    """Prompt-lookup decoding on an all-sliding model past the window: what DynamicCache does (transformers
    >= 5.x activates past recording for it; where DynamicCache itself refuses, the caches refuse too)."""
    model = sliding_model()
    ids = torch.randint(3, 20, (1, 24), generator=torch.Generator().manual_seed(3))
    settings = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3, pad_token_id=0)
    exact, compressing = caches(model)[name]
    try:
        ref = model.generate(ids, past_key_values=tf.DynamicCache(config=model.config), **settings)
    except (RuntimeError, ValueError) as error:  # transformers without past recording (5.0)
        assert "sliding" in str(error).lower() or "window" in str(error).lower(), error
        with pytest.raises((RuntimeError, ValueError), match="sliding|window"):
            model.generate(ids, past_key_values=exact(model.config), **settings)
        return
    assert torch.equal(model.generate(ids, past_key_values=exact(model.config), **settings), ref)
    if name == "kivi":  # keys quantized per group: a rollback into a group is refused by name
        compressing = functools.partial(KIVICache, bits=2, group_size=4, residual=8)
    assert model.generate(ids, past_key_values=compressing(model.config), **settings).shape == ref.shape


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
@pytest.mark.parametrize("compressed_prefill", [False, True])
def test_sliding_eviction_with_a_window_sized_budget_is_exact(policy, compressed_prefill):
    """A budget of W - 1 tokens keeps every token a sliding window can see: sinks and recent tokens that have
    left the window are not protected over tokens inside it (a fresh user's report: sinks 0, 1 kept, in-window
    tokens evicted). Exact against DynamicCache, before and after the window is full."""
    model = sliding_model()
    want = scores(model, tf.DynamicCache(config=model.config), new=SLIDING_NEW)
    cache = EvictionCache(model.config, budget=WINDOW - 1, sink=2, policy=policy, compressed_prefill=compressed_prefill)
    torch.testing.assert_close(scores(model, cache, new=SLIDING_NEW), want, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].k.shape[2] == WINDOW - 1


def test_h1b_window_of_w_keeps_a_sliding_layer_exact():
    """The newest ``window`` tokens stay exact; a decode query sees W tokens (W - 1 kept and its own), so
    ``window >= W`` keeps a sliding layer exact and ``window = W - 1`` compresses the oldest visible one."""
    model = sliding_model()
    want = scores(model, tf.DynamicCache(config=model.config), new=SLIDING_NEW)
    torch.testing.assert_close(scores(model, H1BCache(model.config, bits=32, window=WINDOW), new=SLIDING_NEW), want,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores(model, H1BCache(model.config, bits=32, window=WINDOW - 1), new=SLIDING_NEW),
                              want, atol=1e-5, rtol=1e-5)
