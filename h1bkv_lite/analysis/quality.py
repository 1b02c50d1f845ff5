"""Quality per byte: one perplexity sweep over H1B-KV and the baselines, its Pareto front, and verdicts.

Behind notebook 05. A *setting* (:class:`Setting`) is one cache configuration of one family:

=============  ==========================================================================================
``fp16``       exact cache (:class:`~h1bkv_lite.baselines.FP16Cache`)
``h1b``        :class:`~h1bkv_lite.cache.H1BCache` (``bits``, ``score``, ``value_bits``, ``window``, ``sink``)
``kivi``       :class:`~h1bkv_lite.baselines.KIVICache` (``bits``, ``group_size``, ``residual``)
``streaming``  :class:`~h1bkv_lite.baselines.EvictionCache` ``policy="streaming"`` (``budget``, ``sink``)
``h2o``        :class:`~h1bkv_lite.baselines.EvictionCache` ``policy="h2o"`` (``budget``, ``sink``)
``loki``       :class:`~h1bkv_lite.baselines.LokiCache` (``rank``, ``top_k``; basis from ``calibrate_loki``)
=============  ==========================================================================================

Bytes are those of :func:`h1bkv_lite.memory.kv_cache_bytes` (16-bit accounting: exact tokens cost 2 bytes
per element) for one sequence at the evaluation length, divided by that length; "bits per element" is the
same total spread over every cached key and value element (``8 * bytes_per_token / (2 * L * Hkv * D)``:
FP16 = 16). H1B sink tokens are exact fp16 tokens like the window's, so a sink of ``s`` costs exactly what
``s`` more window tokens cost; :func:`scheme_of` uses ``memory.H1B(sink=...)`` where that field exists.

Verdicts compare families at matched or lower bytes: a point ``q`` *beats* a point ``p`` when
``q.bytes <= p.bytes`` and ``q.ppl < p.ppl`` (:func:`compare_families`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .. import memory
from .._device import model_device
from .._validation import check_choice, check_int, check_sketch_bits

__all__ = [
    "BASELINE_FAMILIES",
    "FAMILIES",
    "FAMILY_LABELS",
    "H1B_SCORES",
    "Setting",
    "agreement_prompts",
    "bits_per_element",
    "build_sweep",
    "bytes_per_token",
    "compare_families",
    "exact_fraction",
    "h1b_effects",
    "matched_settings",
    "measure_cache_bytes",
    "pareto_front",
    "passkey_summary",
    "agreement_summary",
    "run_sweep",
    "scheme_of",
    "sweep_table",
    "usable_passkey_lengths",
    "verdict_lines",
]

FAMILIES = ("fp16", "h1b", "kivi", "streaming", "h2o", "loki")
BASELINE_FAMILIES = ("kivi", "streaming", "h2o", "loki")
FAMILY_LABELS = {"fp16": "FP16", "h1b": "H1B-KV", "kivi": "KIVI", "streaming": "StreamingLLM", "h2o": "H2O",
                 "loki": "Loki"}
H1B_SCORES = ("hamming", "cos", "asym")
_VALUE_BITS = (2, 4, 8)


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """One cache configuration. Fields that do not apply to ``family`` stay None (``window``/``sink``: 0)."""

    family: str
    bits: int | None = None  # h1b: sketch bits per key and kv head; kivi: quantization bits
    score: str | None = None  # h1b only
    value_bits: int | None = None  # h1b only
    window: int = 0  # h1b: newest tokens kept exact
    sink: int = 0  # h1b, streaming, h2o: first tokens kept exact
    budget: int | None = None  # streaming, h2o: tokens kept
    rank: int | None = None  # loki
    top_k: int | None = None  # loki
    group_size: int | None = None  # kivi
    residual: int | None = None  # kivi

    def __post_init__(self) -> None:
        check_choice("family", self.family, FAMILIES)
        check_int("window", self.window, low=0)
        check_int("sink", self.sink, low=0)
        f = self.family
        need = {"h1b": ("bits", "score", "value_bits"), "kivi": ("bits", "group_size", "residual"),
                "streaming": ("budget",), "h2o": ("budget",), "loki": ("rank", "top_k"), "fp16": ()}[f]
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"a {f!r} setting needs {name}")
        allowed = set(need) | {"window", "sink"} if f == "h1b" else set(need) | (
            {"sink"} if f in ("streaming", "h2o") else set())
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "family" and field.name not in allowed and value not in (None, 0):
                raise ValueError(f"{field.name}={value!r} does not apply to a {f!r} setting")
        if f == "h1b":
            check_sketch_bits(self.bits)
            check_choice("score", self.score, H1B_SCORES)
            check_choice("value_bits", self.value_bits, _VALUE_BITS)
        elif f == "kivi":
            check_choice("bits", self.bits, _VALUE_BITS)
            check_int("group_size", self.group_size, low=1)
            check_int("residual", self.residual, low=0)
        elif f in ("streaming", "h2o"):
            check_int("budget", self.budget, low=1)
            if self.sink >= self.budget:
                raise ValueError(f"sink ({self.sink}) must be smaller than budget ({self.budget})")
        elif f == "loki":
            check_int("rank", self.rank, low=1)
            check_int("top_k", self.top_k, low=1)

    @property
    def name(self) -> str:
        """A short unique label, e.g. ``"H1B b=64 asym v4 w64+4s"``, ``"KIVI-2"``, ``"H2O 128"``."""
        f = self.family
        if f == "fp16":
            return "FP16"
        if f == "h1b":
            tail = f" w{self.window}+{self.sink}s" if self.sink else (f" w{self.window}" if self.window else "")
            return f"H1B b={self.bits} {self.score} v{self.value_bits}{tail}"
        if f == "kivi":
            return f"KIVI-{self.bits}"
        if f in ("streaming", "h2o"):
            return f"{FAMILY_LABELS[f]} {self.budget}"
        return f"Loki r{self.rank} k{self.top_k}"

    @property
    def params(self) -> dict:
        """The fields that apply to this family (family included)."""
        keep = {"h1b": ("window", "sink"), "streaming": ("sink",), "h2o": ("sink",)}.get(self.family, ())
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and (k not in ("window", "sink") or k in keep)}

    def factory(self, *, temperature=None, loki_basis=None, seed: int = 0):
        """A cache factory ``(config, compressed_prefill=...) -> Cache`` for :mod:`h1bkv_lite.eval`.

        ``temperature``: required for ``score="hamming"`` (e.g. from :func:`~h1bkv_lite.cache.fit_temperature`
        on other text; the cache's own prefill calibration would be an oracle). ``loki_basis``: required for
        Loki (:func:`~h1bkv_lite.baselines.calibrate_loki`). ``seed``: H1B sketch seed (must match the one the
        temperature was fitted with).
        """
        from ..baselines import EvictionCache, FP16Cache, KIVICache, LokiCache  # noqa: PLC0415
        from ..cache import H1BCache  # noqa: PLC0415

        f = self.family
        if f == "fp16":
            return FP16Cache
        if f == "h1b":
            if self.score == "hamming" and temperature is None:
                raise ValueError(f"{self.name}: score='hamming' needs a temperature fitted on other text "
                                 "(fit_temperature); None would calibrate on the evaluated text itself (an oracle)")
            kwargs = {"temperature": temperature} if self.score == "hamming" else {}
            return functools.partial(H1BCache, bits=self.bits, score=self.score, value_bits=self.value_bits,
                                     window=self.window, sink=self.sink, seed=seed, **kwargs)
        if f == "kivi":
            return functools.partial(KIVICache, bits=self.bits, group_size=self.group_size, residual=self.residual)
        if f in ("streaming", "h2o"):
            return functools.partial(EvictionCache, budget=self.budget, policy=f, sink=self.sink)
        if loki_basis is None:
            raise ValueError(f"{self.name}: Loki needs loki_basis (calibrate_loki on other text)")
        return functools.partial(LokiCache, rank=self.rank, top_k=self.top_k, basis=loki_basis)


def _h1b_has_sink_field() -> bool:
    return "sink" in {f.name for f in dataclasses.fields(memory.H1B)}


def scheme_of(setting: Setting):
    """The :mod:`h1bkv_lite.memory` scheme whose bytes ``setting`` stores.

    H1B sinks: ``memory.H1B(..., sink=s)`` if the scheme has that field, else ``window + s`` (the same bytes:
    sink and window tokens are both exact fp16 K and V).
    """
    if not isinstance(setting, Setting):
        raise TypeError(f"setting must be a Setting, got {type(setting).__name__}")
    f = setting.family
    if f == "fp16":
        return memory.FP16()
    if f == "h1b":
        common = dict(bits=setting.bits, value_bits=setting.value_bits, group_size=None,
                      key_norms=setting.score != "hamming")
        if _h1b_has_sink_field():
            return memory.H1B(**common, window=setting.window, sink=setting.sink)
        return memory.H1B(**common, window=setting.window + setting.sink)
    if f == "kivi":
        return memory.KIVI(setting.bits, setting.group_size, setting.residual)
    if f in ("streaming", "h2o"):
        return memory.Eviction(setting.budget)
    return memory.LowRankKeys(setting.rank)


def bytes_per_token(config, seq_len: int, setting: Setting) -> float:
    """Cache bytes per token of one sequence holding ``seq_len`` tokens (``memory.kv_cache_bytes``)."""
    check_int("seq_len", seq_len, low=1)
    return memory.kv_cache_bytes(config, seq_len, 1, scheme_of(setting)).per_token


def bits_per_element(config, bytes_per_tok: float) -> float:
    """``8 * bytes_per_token / (2 * L * Hkv * D)``: average stored bits per cached key/value element."""
    shape = memory.model_shape(config)
    if not math.isfinite(bytes_per_tok) or bytes_per_tok < 0:
        raise ValueError(f"bytes_per_tok must be finite and >= 0, got {bytes_per_tok}")
    return 8 * bytes_per_tok / (2 * shape.num_layers * shape.num_kv_heads * shape.head_dim)


def _unique(name: str, values, check) -> list:
    values = list(values)
    for v in values:
        check(v)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    return values


def exact_fraction(setting: Setting, n: int) -> float:
    """Share of ``n`` context tokens that ``setting`` keeps exactly (fp16 K and V) at rest.

    FP16 and Loki (which stores everything; each query reads its top-k): 1. H1B: ``window + sink`` tokens.
    KIVI: the residual plus any incomplete token group. Eviction: the ``budget`` kept tokens (the rest are gone).
    """
    if not isinstance(setting, Setting):
        raise TypeError(f"setting must be a Setting, got {type(setting).__name__}")
    check_int("n", n, low=1)
    f = setting.family
    if f in ("fp16", "loki"):
        return 1.0
    if f == "h1b":
        return min(setting.window + setting.sink, n) / n
    if f == "kivi":
        g = setting.group_size
        q = (n - setting.residual) // g * g if n > setting.residual else 0
        return (n - q) / n
    return min(setting.budget, n) / n


def build_sweep(*, h1b_bits: Iterable[int] = (32, 64, 128, 256), h1b_scores: Iterable[str] = H1B_SCORES,
                h1b_value_bits: Iterable[int] = (4,), h1b_windows: Iterable[tuple[int, int]] = ((0, 0), (64, 4)),
                h1b_extra: Iterable[Mapping] = (), kivi_bits: Iterable[int] = (2, 4), kivi_group_size: int = 32,
                kivi_residual: int = 128, streaming_budgets: Iterable[int] = (64, 128, 256),
                h2o_budgets: Iterable[int] = (128,), eviction_sink: int = 4, loki_ranks: Iterable[int] = (8, 16, 32),
                loki_top_k: int = 64, fp16: bool = True) -> list[Setting]:
    """Every setting of the sweep, in a fixed order: FP16, H1B grid (bits x scores x value bits x windows),
    ``h1b_extra`` (dicts of H1B fields, e.g. one 2-bit-value setting), KIVI, StreamingLLM, H2O, Loki.

    ``h1b_windows``: ``(window, sink)`` pairs. Empty lists leave a family out. Raises ValueError/TypeError
    for invalid or duplicated values, naming the argument.
    """
    bits = _unique("h1b_bits", h1b_bits, check_sketch_bits)
    scores = _unique("h1b_scores", h1b_scores, lambda s: check_choice("h1b_scores", s, H1B_SCORES))
    vbits = _unique("h1b_value_bits", h1b_value_bits, lambda b: check_choice("h1b_value_bits", b, _VALUE_BITS))

    def check_window(pair):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise TypeError(f"h1b_windows entries must be (window, sink) pairs, got {pair!r}")
        check_int("window", pair[0], low=0)
        check_int("sink", pair[1], low=0)

    windows = [tuple(w) for w in _unique("h1b_windows", [tuple(w) if isinstance(w, list) else w for w in h1b_windows],
                                         check_window)]
    settings = [Setting("fp16")] if fp16 else []
    for b in bits:
        for s in scores:
            for v in vbits:
                for w, sk in windows:
                    settings.append(Setting("h1b", bits=b, score=s, value_bits=v, window=w, sink=sk))
    for extra in h1b_extra:
        if not isinstance(extra, Mapping):
            raise TypeError(f"h1b_extra entries must be dicts of H1B fields, got {extra!r}")
        fields = {"value_bits": 4, "window": 0, "sink": 0, **extra}
        settings.append(Setting("h1b", **fields))
    check_int("kivi_group_size", kivi_group_size, low=1)
    check_int("kivi_residual", kivi_residual, low=0)
    for b in _unique("kivi_bits", kivi_bits, lambda b: check_choice("kivi_bits", b, _VALUE_BITS)):
        settings.append(Setting("kivi", bits=b, group_size=kivi_group_size, residual=kivi_residual))
    check_int("eviction_sink", eviction_sink, low=0)
    for policy, budgets in (("streaming", streaming_budgets), ("h2o", h2o_budgets)):
        for n in _unique(f"{policy}_budgets", budgets, lambda n: check_int("budget", n, low=1)):
            settings.append(Setting(policy, budget=n, sink=eviction_sink))
    check_int("loki_top_k", loki_top_k, low=1)
    for r in _unique("loki_ranks", loki_ranks, lambda r: check_int("loki_ranks", r, low=1)):
        settings.append(Setting("loki", rank=r, top_k=loki_top_k))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the sweep has duplicated settings: {dup}")
    return settings


def sweep_table(settings: Sequence[Setting], config, seq_len: int) -> pd.DataFrame:
    """One row per setting (no perplexity yet): name, family, its fields, bytes per token at ``seq_len`` and
    at 8192 tokens, bits per element (all stored bytes) and the compressed region's key/value bits per
    element (:func:`memory.bits_per_element`)."""
    shape = memory.model_shape(config)
    rows = []
    for s in settings:
        bpt = bytes_per_token(config, seq_len, s)
        elt = memory.bits_per_element(scheme_of(s), shape.head_dim)
        rows.append({"name": s.name, **s.params, "seq_len": seq_len, "bytes_per_token": bpt,
                     "bits_per_element": bits_per_element(config, bpt),
                     "fp16_fraction": bpt / bytes_per_token(config, seq_len, Setting("fp16")),
                     "bytes_per_token_8k": bytes_per_token(config, 8192, s),
                     "key_bits_per_element": elt["keys"], "value_bits_per_element": elt["values"]})
    cols = ["name", "family"] + [f.name for f in dataclasses.fields(Setting) if f.name != "family"]
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df:
            df[c] = None
    return df[cols + [c for c in df.columns if c not in cols]]


# ------------------------------------------------------------------------------------------------ running
def _factory_for(setting: Setting, temperatures, loki_basis, seed):
    temp = None
    if setting.family == "h1b" and setting.score == "hamming":
        if temperatures is None or setting.bits not in temperatures:
            raise ValueError(f"{setting.name}: no fitted temperature for b={setting.bits} in temperatures")
        temp = temperatures[setting.bits]
    return setting.factory(temperature=temp, loki_basis=loki_basis, seed=seed)


def run_sweep(model, ids, settings: Sequence[Setting], *, temperatures: Mapping | None = None, loki_basis=None,
              seed: int = 0, progress: bool = True, log=print) -> pd.DataFrame:
    """Perplexity of every setting on ``ids [n, T]`` through :func:`h1bkv_lite.eval.perplexity`
    (compressed-prefill semantics: each query sees only what the method would have kept).

    ``temperatures``: ``{bits: [L, Hq] tensor}`` for the hamming settings; ``loki_basis``: for Loki.
    Returns :func:`sweep_table` plus ``tokens, nll, ppl`` (over all windows) and ``runtime_s``.
    ``log``: called with one line per finished setting (None: silent).
    """
    from ..eval import perplexity  # noqa: PLC0415

    if ids.dim() != 2:
        raise ValueError(f"ids must be [n_windows, seq_len], got shape {tuple(ids.shape)}")
    table = sweep_table(settings, model.config, ids.shape[1])
    factories = [_factory_for(s, temperatures, loki_basis, seed) for s in settings]  # fail before running
    out = []
    for s, factory in zip(settings, factories):
        start = time.perf_counter()
        df = perplexity(model, ids, factory, progress=progress)
        tokens, nll = int(df.tokens.sum()), float(df.nll.sum())
        out.append({"tokens": tokens, "nll": nll, "ppl": math.exp(nll / tokens),
                    "runtime_s": time.perf_counter() - start})
        if log is not None:
            log(f"{s.name:32s} {table.bytes_per_token.iloc[len(out) - 1]:9.0f} B/token  "
                f"ppl {out[-1]['ppl']:9.2f}  ({out[-1]['runtime_s']:.1f} s)")
    return pd.concat([table, pd.DataFrame(out)], axis=1)


def measure_cache_bytes(model, ids, settings: Sequence[Setting], *, temperatures: Mapping | None = None,
                        loki_basis=None, seed: int = 0) -> pd.Series:
    """True ``cache.nbytes()`` per token after an exact prefill of ``ids [1, T]``, per setting name.

    Use a 16-bit model (e.g. a bfloat16 copy) so that exact tokens cost 2 bytes per element, as in
    :func:`memory.kv_cache_bytes`.
    """
    import torch  # noqa: PLC0415

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [1, T], got shape {tuple(ids.shape)}")
    measured = {}
    with torch.no_grad():
        for s in settings:
            cache = _factory_for(s, temperatures, loki_basis, seed)(model.config)
            model(input_ids=ids.to(model_device(model)), past_key_values=cache, use_cache=True)
            measured[s.name] = cache.nbytes() / ids.shape[1]
    return pd.Series(measured, name="measured_bytes_per_token")


# ------------------------------------------------------------------------------------------------ analysis
def _xy(df: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    for c in (x, y):
        if c not in df.columns:
            raise KeyError(f"df has no column {c!r} (columns: {list(df.columns)})")
    xs, ys = df[x].to_numpy(dtype=float), df[y].to_numpy(dtype=float)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError(f"columns {x!r} and {y!r} must be finite (no NaN/inf)")
    return xs, ys


def pareto_front(df: pd.DataFrame, x: str = "bytes_per_token", y: str = "ppl") -> pd.Series:
    """Boolean Series (``df``'s index): True where no other row has ``x <=`` and ``y <=`` with one strict.

    Both columns are minimised; identical points are all kept. O(n log n): sort by ``(x, y)`` and keep each
    group of equal ``x`` whose smallest ``y`` beats everything to its left.
    """
    xs, ys = _xy(df, x, y)
    on = np.zeros(len(df), dtype=bool)
    order = np.lexsort((ys, xs))
    best = math.inf
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and xs[order[j]] == xs[order[i]]:
            j += 1
        group = order[i:j]
        low = ys[group].min()
        if low < best:
            on[group[ys[group] == low]] = True
            best = low
        i = j
    return pd.Series(on, index=df.index, name="pareto")


def _beaten(by_x, by_y, x, y) -> np.ndarray:
    """For each (x[i], y[i]): is some (by_x[j], by_y[j]) at ``<= x`` with ``< y``? And by whom (index or -1)."""
    winner = np.full(len(x), -1)
    for i in range(len(x)):
        ok = (by_x <= x[i]) & (by_y < y[i])
        if ok.any():
            cand = np.flatnonzero(ok)
            winner[i] = cand[np.argmin(by_y[cand])]
    return winner


def compare_families(df: pd.DataFrame, challenger: str = "h1b", baselines: Iterable[str] = BASELINE_FAMILIES,
                     x: str = "bytes_per_token", y: str = "ppl") -> pd.DataFrame:
    """Does ``challenger`` beat each baseline family at matched or lower bytes?

    One row per baseline family present in ``df`` (columns ``family``, ``name``, ``x``, ``y``):
    ``n_challenger, n_baseline``; ``baseline_beaten`` = baseline points for which some challenger point
    has ``x <=`` and ``y <``; ``challenger_beaten`` = the reverse; ``verdict``:
    "challenger better" (it beats some baseline points and loses none), "baseline better" (the reverse),
    "mixed" (both), "neither" (no point of either is beaten: e.g. the baseline is only ever larger and better);
    ``claim_holds`` = verdict is "challenger better"; the best challenger/baseline point (lowest ``y``),
    and ``example``: for the cheapest beaten point of the losing side, who beats it.
    """
    for c in ("family", "name"):
        if c not in df.columns:
            raise KeyError(f"df has no column {c!r}")
    xs, ys = _xy(df, x, y)
    families = set(df.family)
    baselines = list(baselines)
    for f in [challenger, *baselines]:
        check_choice("family", f, FAMILIES)
    if challenger in baselines:
        raise ValueError(f"challenger {challenger!r} is also listed as a baseline")
    if challenger not in families:
        raise ValueError(f"no {challenger!r} rows in df")
    ch = (df.family == challenger).to_numpy()
    names = df.name.to_numpy()
    rows = []
    for f in baselines:
        if f not in families:
            continue
        bl = (df.family == f).to_numpy()
        cx, cy, bx, by = xs[ch], ys[ch], xs[bl], ys[bl]
        b_lost = _beaten(cx, cy, bx, by)  # challenger index beating each baseline point
        c_lost = _beaten(bx, by, cx, cy)
        nb, nc = int((b_lost >= 0).sum()), int((c_lost >= 0).sum())
        verdict = ("mixed" if nb and nc else "challenger better" if nb else "baseline better" if nc else "neither")
        example = ""
        if verdict in ("challenger better", "mixed"):
            i = np.flatnonzero(b_lost >= 0)[np.argmin(bx[b_lost >= 0])]
            example = f"{names[ch][b_lost[i]]} beats {names[bl][i]}"
        if verdict in ("baseline better", "mixed"):
            i = np.flatnonzero(c_lost >= 0)[np.argmin(cx[c_lost >= 0])]
            example = (example + "; " if example else "") + f"{names[bl][c_lost[i]]} beats {names[ch][i]}"
        ib, ic = int(np.argmin(by)), int(np.argmin(cy))
        rows.append({
            "challenger": challenger, "baseline": f, "n_challenger": int(ch.sum()), "n_baseline": int(bl.sum()),
            "baseline_beaten": nb, "challenger_beaten": nc, "verdict": verdict,
            "claim_holds": verdict == "challenger better",
            "best_challenger": names[ch][ic], "best_challenger_x": float(cx[ic]), "best_challenger_y": float(cy[ic]),
            "best_baseline": names[bl][ib], "best_baseline_x": float(bx[ib]), "best_baseline_y": float(by[ib]),
            "min_challenger_x": float(cx.min()), "max_challenger_x": float(cx.max()),
            "min_baseline_x": float(bx.min()), "max_baseline_x": float(bx.max()), "example": example,
        })
    return pd.DataFrame(rows)


def verdict_lines(comparison: pd.DataFrame, front: pd.DataFrame | None = None, *, fp16_ppl: float | None = None,
                  unit: str = "B/token") -> list[str]:
    """Markdown lines, one per row of :func:`compare_families` (+ which families make the Pareto front)."""
    lines = []
    for r in comparison.itertuples():
        ch, bl = FAMILY_LABELS[r.challenger], FAMILY_LABELS[r.baseline]
        best = (f"best {bl}: {r.best_baseline} (ppl {r.best_baseline_y:.1f} at {r.best_baseline_x:.0f} {unit}); "
                f"best {ch}: {r.best_challenger} (ppl {r.best_challenger_y:.1f} at {r.best_challenger_x:.0f} {unit})")
        if r.verdict == "challenger better":
            head = (f"**{ch} vs {bl}: claim holds.** At matched or lower bytes {ch} has the lower perplexity for "
                    f"{r.baseline_beaten} of {r.n_baseline} {bl} settings and never loses ({r.example})")
        elif r.verdict == "baseline better":
            head = (f"**{ch} vs {bl}: claim fails.** {bl} has lower perplexity at matched or lower bytes than "
                    f"{r.challenger_beaten} of {r.n_challenger} {ch} settings, and no {bl} setting is beaten "
                    f"({r.example})")
        elif r.verdict == "mixed":
            head = (f"**{ch} vs {bl}: mixed.** {ch} beats {r.baseline_beaten} of {r.n_baseline} {bl} settings at "
                    f"matched or lower bytes, {bl} beats {r.challenger_beaten} of {r.n_challenger} {ch} settings "
                    f"({r.example})")
        elif r.max_challenger_x < r.min_baseline_x and r.best_challenger_y >= r.best_baseline_y:
            head = (f"**{ch} vs {bl}: neither beats the other at matched bytes, so the claim is not shown.** Every "
                    f"{ch} setting is smaller than every {bl} setting (<= {r.max_challenger_x:.0f} vs >= "
                    f"{r.min_baseline_x:.0f} {unit}) but none reaches the perplexity of any {bl} setting")
        else:
            head = f"**{ch} vs {bl}: neither beats the other at matched or lower bytes**"
        lines.append(f"{head}; {best}.")
        if fp16_ppl is not None:
            lines[-1] += f" (FP16 ppl {fp16_ppl:.1f}.)"
    if front is not None and len(front):
        fams = ", ".join(f"{FAMILY_LABELS[f]} ({n})" for f, n in front.family.value_counts().items())
        lines.append(f"**Pareto front (all methods, bytes/token vs ppl):** {len(front)} points — {fams}: "
                     + ", ".join(front.sort_values("bytes_per_token").name) + ".")
    return lines


# ------------------------------------------------------------------------------------------------ passkey, agreement
def usable_passkey_lengths(fp16: pd.DataFrame, min_accuracy: float = 0.5) -> list[int]:
    """Lengths where FP16's own passkey accuracy (``correct`` mean over depths and trials) is ``>= min_accuracy``."""
    if not 0 <= min_accuracy <= 1:
        raise ValueError(f"min_accuracy must be in [0, 1], got {min_accuracy}")
    for c in ("length", "correct"):
        if c not in fp16.columns:
            raise KeyError(f"passkey results have no column {c!r}")
    acc = fp16.groupby("length").correct.mean()
    return [int(n) for n, a in acc.items() if a >= min_accuracy]


def passkey_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per ``method`` and ``length`` (tidy): ``method, length, trials, correct, accuracy``, plus
    ``fp16_accuracy`` (the ceiling, when an ``"fp16"`` method is present) and ``relative`` = accuracy / ceiling."""
    for c in ("method", "length", "correct"):
        if c not in results.columns:
            raise KeyError(f"passkey results have no column {c!r}")
    g = results.groupby(["method", "length"], sort=False).correct
    out = pd.DataFrame({"trials": g.size(), "correct": g.sum().astype(int), "accuracy": g.mean()}).reset_index()
    fp16 = out[out.method == "fp16"].set_index("length").accuracy
    out["fp16_accuracy"] = out.length.map(fp16) if len(fp16) else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        out["relative"] = out.accuracy / out.fp16_accuracy.where(out.fp16_accuracy > 0)
    return out


def agreement_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over prompts per method of :func:`h1bkv_lite.eval.generation_agreement`'s columns."""
    cols = ["match_rate", "first_mismatch", "teacher_forced_match"]
    for c in ["method", "prompt_tokens", *cols]:
        if c not in results.columns:
            raise KeyError(f"agreement results have no column {c!r}")
    g = results.groupby("method", sort=False)
    return pd.concat([g.size().rename("prompts"), g.prompt_tokens.mean().rename("prompt_tokens"), g[cols].mean()],
                     axis=1).reset_index()


def agreement_prompts(ids: Sequence[int], n: int, length: int, *, start: int = 0) -> list[list[int]]:
    """``n`` consecutive, non-overlapping ``length``-token prompts from token ids, from ``start`` on."""
    check_int("n", n, low=1)
    check_int("length", length, low=1)
    check_int("start", start, low=0)
    ids = [int(t) for t in ids]
    if start + n * length > len(ids):
        raise ValueError(f"need {start + n * length} tokens for {n} prompts of {length} from {start}, got {len(ids)}")
    return [ids[start + i * length : start + (i + 1) * length] for i in range(n)]


# ------------------------------------------------------------------------------------------------ choices, H1B effects
def matched_settings(results: pd.DataFrame, settings: Sequence[Setting], *, families: Iterable[str] = BASELINE_FAMILIES,
                     x: str = "bytes_per_token", y: str = "ppl") -> list[Setting]:
    """A short list for the slower evaluations (passkey, agreement): FP16; the paper's H1B form (hamming, the
    widest b, no window, 4-bit values) if run; the H1B setting of lowest ``y``; and per baseline family the
    setting whose ``x`` is closest (in log) to that best H1B's. Order kept, no duplicates."""
    by_name = {s.name: s for s in settings}
    missing = set(results.name) - set(by_name)
    if missing:
        raise ValueError(f"results have rows for settings not in settings: {sorted(missing)}")
    res = results.set_index("name")
    chosen = [n for n in res.index if by_name[n].family == "fp16"]
    h1b = res[res.family == "h1b"]
    if len(h1b):
        paper = [n for n in h1b.index if by_name[n].score == "hamming" and by_name[n].window == 0
                 and by_name[n].sink == 0 and by_name[n].value_bits == 4]
        if paper:
            chosen.append(max(paper, key=lambda n: by_name[n].bits))
        best = h1b[y].idxmin()
        chosen.append(best)
        target = math.log(h1b.loc[best, x])
        for f in families:
            fam = res[res.family == f]
            if len(fam):
                chosen.append((fam[x].map(math.log) - target).abs().idxmin())
    out, seen = [], set()
    for n in chosen:
        if n not in seen:
            seen.add(n)
            out.append(by_name[n])
    return out


def h1b_effects(results: pd.DataFrame, y: str = "ppl") -> dict:
    """What each H1B switch does to ``y``, from the sweep's H1B rows (ratios < 1 = better):

    ``window``: ``{(bits, score): y(window+sink) / y(no window)}`` for 4-bit values;
    ``best_score``: ``{(bits, window, sink): score of lowest y}``;
    ``bits_trend``: ``{(score, window, sink): [y at each b, ascending b]}`` and ``bits``: the b values;
    ``value_bits``: ``{name of a non-4-bit setting: y / y of the same setting at 4 bits}``.
    """
    need = ["family", "name", "bits", "score", "value_bits", "window", "sink", y]
    for c in need:
        if c not in results.columns:
            raise KeyError(f"results have no column {c!r}")
    h = results[results.family == "h1b"].copy()
    if not len(h):
        raise ValueError("no H1B rows in results")
    h[["bits", "value_bits", "window", "sink"]] = h[["bits", "value_bits", "window", "sink"]].astype(int)
    v4 = h[h.value_bits == 4]
    key = ["bits", "score", "window", "sink"]
    idx = v4.set_index(key)[y]
    window = {}
    for (b, s, w, sk), val in idx.items():
        if (w, sk) != (0, 0) and (b, s, 0, 0) in idx.index:
            window[(b, s, w, sk)] = float(val / idx[(b, s, 0, 0)])
    best_score = {k: g.loc[g[y].idxmin(), "score"] for k, g in v4.groupby(["bits", "window", "sink"])}
    bits = sorted(v4.bits.unique().tolist())
    trend = {k: [float(g.set_index("bits")[y].get(b, np.nan)) for b in bits]
             for k, g in v4.groupby(["score", "window", "sink"])}
    vb = {}
    for r in h[h.value_bits != 4].itertuples():
        ref = (r.bits, r.score, r.window, r.sink)
        if ref in idx.index:
            vb[r.name] = float(getattr(r, y) / idx[ref])
    return {"window": window, "best_score": best_score, "bits": bits, "bits_trend": trend, "value_bits": vb}
