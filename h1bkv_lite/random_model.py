"""Random-init causal LMs of a real model's shape, for timing and memory runs (no weights to download).

Timings and memory depend on a model's shape, not on its weights: a random-init Llama-2-7B runs the same kernels
on the same tensors as the real one.  Its outputs are noise, so quality numbers (perplexity, attention
fidelity, accuracy) measured on it mean nothing.

* :data:`PRESETS` -- ``LlamaConfig`` arguments of the shapes ``benchmarks/generate.py`` times: ``llama-2-7b``,
  ``llama-3-8b`` and ``tiny`` (a 4-layer smoke-test model).
* :func:`random_config` -- a preset, or any Hugging Face config (Hub id or local folder), as a config object.
* :func:`random_model` -- that config as a seeded random-init model, in eval mode.
* :func:`save_random_model` -- the model and a tokenizer saved as a folder that :func:`h1bkv_lite.data.load_model`
  and the notebooks' ``MODEL`` parameter load like any checkpoint.

From the shell::

    python -m h1bkv_lite.random_model llama-2-7b --out /tmp/llama2-7b-random      # bfloat16, 13.8 GB on disk
    papermill notebooks/02_attention_fidelity.ipynb out.ipynb -p MODEL /tmp/llama2-7b-random -p DEVICE cuda

Host memory: the model is built on the CPU directly in the requested dtype (never float32 first), so saving a
7B model needs its size in RAM (and on disk): parameters x 2 bytes in bfloat16/float16.  Llama-2-7B is 6.74 G
parameters, 13.5 GB (its own 32000-token vocabulary); :func:`save_random_model` sizes the vocabulary to the
tokenizer's, 49152 for the bundled SmolLM2 one: 6.88 G parameters, 13.8 GB (Llama-3-8B: 16.1 GB with its
128256 tokens, 14.8 GB with 49152).  The size is computed first on the "meta" device (no memory) and a warning
is given when it exceeds the host's available memory.

Not to be confused with :data:`h1bkv_lite.memory.PRESETS` (``ModelShape`` s for byte accounting).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from .runtime import resolve_dtype

__all__ = ["DTYPES", "PRESETS", "random_config", "random_model", "save_random_model"]

PRESETS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=131072),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0),
    "tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=16384),
}
"""``LlamaConfig`` keyword arguments by preset name.  ``max_position_embeddings`` is 131072 for the 7B/8B shapes
(longer than the released models' contexts) so that long-prompt benchmarks run; RoPE does not care."""

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""Parameter dtypes accepted, by name (a ``torch.dtype`` among these values is accepted too; names are read by
:func:`h1bkv_lite.runtime.resolve_dtype`, without its "auto")."""


def _check_name(name) -> str:
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a preset among {list(PRESETS)}, an HF config id or a "
                        f"local folder), got {type(name).__name__} {name!r}")
    return name


def random_config(name: str, *, vocab_size: int | None = None, attn_implementation: str = "sdpa"):
    """The config of a random-init model: a preset, or any Hugging Face config.

    Args:
        name: a key of :data:`PRESETS` (``"llama-2-7b"``, ``"llama-3-8b"``, ``"tiny"``) -> ``LlamaConfig(**preset)``;
            anything else goes to ``AutoConfig.from_pretrained`` (an HF Hub id, read from the local HF cache when
            ``HF_HUB_OFFLINE=1``, or a local folder holding a ``config.json``).  Only the config is read, never
            weights.  A ``str`` (an ``os.PathLike`` is taken as its path).
        vocab_size: if given, replaces the config's vocabulary size (of its text model, for multimodal configs),
            so that the model's embedding and ``lm_head`` rows match a tokenizer (``len(tokenizer)``).
        attn_implementation: the attention backend recorded in the config (``"sdpa"``, ``"eager"``, ...).

    Returns:
        A ``transformers`` config object (a fresh one on each call).

    Raises:
        TypeError: ``name`` is not a non-empty str, or ``vocab_size`` is not an int.
        ValueError: ``name`` is neither a preset nor a config ``transformers`` can read (the message lists the
            presets and carries transformers' own error); ``vocab_size < 1``.
    """
    from transformers import AutoConfig, LlamaConfig  # noqa: PLC0415

    from ._validation import check_int  # noqa: PLC0415

    name = _check_name(name)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, low=1)
    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], attn_implementation=attn_implementation)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as err:  # not on the Hub / not cached offline / no config.json / unknown type
            raise ValueError(
                f"name={name!r} is neither a preset ({', '.join(PRESETS)}) nor a config transformers can read "
                "(an HF Hub id -- from the local HF cache when HF_HUB_OFFLINE=1 -- or a local folder with a "
                f"config.json): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err
        config._attn_implementation = attn_implementation
    if vocab_size is not None:
        config.get_text_config().vocab_size = vocab_size
    return config


def _build(config, dtype: torch.dtype, device, seed: int):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_model(name: str, *, dtype: torch.dtype | str = torch.float16, device: str | torch.device = "cpu",
                 seed: int = 0, vocab_size: int | None = None):
    """A random-init causal LM of ``name``'s shape, in eval mode (its outputs are noise: for timings and memory).

    ``torch.manual_seed(seed)``, then ``AutoModelForCausalLM.from_config`` under ``torch.device(device)``: the
    parameters are allocated on ``device`` directly, in ``dtype`` directly (no float32 copy first).  On
    ``device="meta"`` nothing is allocated (shapes only).  Same ``name``, ``dtype``, ``device`` and ``seed`` ->
    the same weights (on CPU, bit for bit).

    Args:
        name: a preset of :data:`PRESETS` or an HF config id / local folder (see :func:`random_config`).
        dtype: parameter dtype, a ``torch.dtype`` or its name (``"float16"``, ``"bfloat16"``, ``"float32"``).
            Rotary buffers stay float32, as in every ``transformers`` model.
        device: where the parameters are created (``"cpu"``, ``"cuda"``, ``"meta"``, a ``torch.device``).
            Memory needed there: parameters x 2 bytes in 16-bit dtypes (13.5 GB for ``llama-2-7b``).
        seed: the ``torch.manual_seed`` the weights are drawn with (it also sets the global torch RNG state).
        vocab_size: overrides the config's vocabulary size (to match a tokenizer); None keeps it.

    Returns:
        The model (``transformers.PreTrainedModel``), ``model.config._attn_implementation == "sdpa"``.

    Raises:
        TypeError / ValueError: a bad ``name`` or ``vocab_size`` (see :func:`random_config`), ``seed`` not an int.
        ValueError: an unknown ``dtype``.
    """
    from ._validation import check_int  # noqa: PLC0415

    dtype = resolve_dtype(dtype, name="dtype", allow_auto=False)
    seed = check_int("seed", seed)
    return _build(random_config(name, vocab_size=vocab_size), dtype, device, seed)


def _available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def save_random_model(name: str, out_dir: str | os.PathLike, *, tokenizer=None,
                      dtype: torch.dtype | str = torch.bfloat16, seed: int = 0, overwrite: bool = False) -> Path:
    """Save a random-init model of ``name``'s shape and a tokenizer as a ``from_pretrained`` folder.

    The folder loads like any checkpoint: ``h1bkv_lite.data.load_model(str(out_dir))`` (weights + tokenizer), a
    notebook's ``-p MODEL out_dir``, ``AutoModelForCausalLM.from_pretrained(out_dir)``.  The weights are random:
    timings and memory are those of the real shape, quality numbers are meaningless.

    The model's vocabulary size is set to ``len(tokenizer)`` (so every token id the tokenizer makes is a valid
    embedding row), and its ``bos``/``eos`` token ids to the tokenizer's where it has them (not ``pad_token_id``,
    which would give the embedding a zeroed ``padding_idx`` row). It is built on the CPU directly in ``dtype`` (its
    size is computed first on the "meta" device, and a warning is given when it exceeds the host's available
    memory): host RAM needed = parameters x 2 bytes in bfloat16/float16, 13.8 GB for ``llama-2-7b`` with the bundled
    tokenizer (vocabulary 49152), and as much free disk. Drawing the weights took about 12 s per G parameters on 2
    CPU cores (a 0.67 G-parameter Llama-2-7B slice); the whole ``llama-2-7b`` folder took 5.5 min on 8 threads of
    an H200 machine's CPU, beside other work (2026-11-30). Weights are written as safetensors (``save_pretrained``'s default shards).

    Args:
        name: a preset of :data:`PRESETS` or an HF config id / local folder (see :func:`random_config`).
        out_dir: the folder to write (created with its parents).  It must not exist or be empty, unless
            ``overwrite``.
        tokenizer: None -> the bundled model's (:func:`h1bkv_lite.data.load_tokenizer`); a ``str`` -> loaded with
            ``load_tokenizer(tokenizer)`` (HF id, local folder, or a ``.gguf`` file); else a tokenizer object.
        dtype: parameter dtype, a ``torch.dtype`` or its name (``"bfloat16"``, ``"float16"``, ``"float32"``).
            Recorded in ``config.json``, so ``load_model(out_dir, dtype=...)`` casts as it would any checkpoint.
        seed: ``torch.manual_seed`` for the weights: the same seed gives the same weights.
        overwrite: write into a non-empty ``out_dir`` (``save_pretrained`` replaces the model and tokenizer files,
            other files stay).

    Returns:
        ``Path(out_dir)``.

    Raises:
        TypeError / ValueError: a bad ``name``, ``seed`` (see :func:`random_model`); ValueError: an unknown
            ``dtype``.
        FileExistsError: ``out_dir`` is a file, or a non-empty folder without ``overwrite``.
    """
    from ._validation import check_bool, check_int  # noqa: PLC0415
    from .data import load_tokenizer  # noqa: PLC0415

    name = _check_name(name)
    dtype = resolve_dtype(dtype, name="dtype", allow_auto=False)
    seed = check_int("seed", seed)
    check_bool("overwrite", overwrite)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        what = "not a folder" if not out.is_dir() else "not empty"
        raise FileExistsError(f"out_dir={str(out)!r} exists and is {what}; choose a new folder (or pass "
                              "overwrite=True / --overwrite)")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(None if tokenizer is None else os.fspath(tokenizer))
    config = random_config(name, vocab_size=len(tokenizer))
    for key in ("bos_token_id", "eos_token_id"):  # not pad: a padding_idx would zero its embedding row
        if getattr(tokenizer, key, None) is not None:
            setattr(config, key, getattr(tokenizer, key))

    meta = _build(config, dtype, "meta", seed)
    need = sum(p.numel() * p.element_size() for p in meta.parameters())
    del meta
    have = _available_host_bytes()
    if have is not None and need > have:
        warnings.warn(f"save_random_model({name!r}): the model needs {need / 1e9:.1f} GB of host memory in "
                      f"{str(dtype).replace('torch.', '')}, more than the {have / 1e9:.1f} GB available; "
                      "the build may be killed for memory", stacklevel=2)

    model = _build(config, dtype, "cpu", seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m h1bkv_lite.random_model NAME --out DIR [--dtype D] [--tokenizer T] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m h1bkv_lite.random_model",
        description="Save a random-init causal LM of a preset's (or any HF config's) shape, with a tokenizer, as a "
                    "folder that h1bkv_lite.data.load_model and the notebooks' MODEL parameter load. The weights "
                    "are random: for timings and memory only (quality numbers are meaningless). Host RAM needed: "
                    "the model's size (13.8 GB for llama-2-7b in bfloat16 with the bundled tokenizer).",
        epilog="example: python -m h1bkv_lite.random_model llama-2-7b --out /tmp/llama2-7b-random")
    parser.add_argument("name", help=f"a preset ({', '.join(PRESETS)}), or an HF config id or local folder "
                                     "(read offline when HF_HUB_OFFLINE=1)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                        help="parameter dtype (default: bfloat16)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer to load with h1bkv_lite.data.load_tokenizer (HF id, folder, .gguf); "
                             "default: the bundled SmolLM2's. The model's vocabulary is set to its size")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the weights (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        out = save_random_model(args.name, args.out, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed,
                                overwrite=args.overwrite)
    except (ValueError, TypeError, FileExistsError) as err:
        parser.error(str(err))
    print(f"wrote {out} (random weights: for timings and memory only)")
    return out


if __name__ == "__main__":
    main()
