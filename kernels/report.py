"""Tables and figures for the decode benchmark (``benchmarks/decode.py``), used by notebook 07.

    df = load_decode_results("benchmarks/results/decode_h200.json")
    fig = plot_decode_times(df); fig = plot_speedup(df); fig = plot_bandwidth(df)

Needs pandas, matplotlib and seaborn (the ``notebooks`` extra); imported lazily so the kernels don't.
"""
from __future__ import annotations

import json
from pathlib import Path


def load_decode_results(path) -> "pandas.DataFrame":
    """One row per benchmarked case, with the run's device, versions and copy bandwidth as columns.

    Rows without both timings are dropped: ``skipped`` (over the run's memory budget) and ``oom``. ``group``
    (query heads per kv head) is derived from ``Hq / Hkv`` where the file lacks it (runs before the GQA grid).
    ``heads`` labels the head layout (``32q/8kv``), with the head_dim (``32q/8kv, d=64``) when the file has more
    than one."""
    import pandas as pd

    result = json.loads(Path(path).read_text())
    df = pd.DataFrame(result["rows"])
    unmeasured = pd.Series(False, index=df.index)
    if "skipped" in df:
        unmeasured |= df["skipped"].notna()
    if "oom" in df:
        unmeasured |= df["oom"].eq(True)
    df = df[~unmeasured].reset_index(drop=True)
    for key in ("device", "torch", "triton", "cuda", "copy_GBps", "date"):
        df[key] = result.get(key)
    if "group" not in df:
        df["group"] = df["Hq"] // df["Hkv"]
    df["heads"] = df["Hq"].astype(str) + "q/" + df["Hkv"].astype(str) + "kv"
    if df["D"].nunique() > 1:
        df["heads"] += ", d=" + df["D"].astype(str)
    df["variant"] = df["score"] + ", b=" + df["bits"].astype(str)
    return df


def decode_table(df) -> "pandas.DataFrame":
    """The benchmark table: times in microseconds, speedup over SDPA, bandwidth as a share of a copy."""
    out = df[["B", "heads", "context", "variant", "h1b_ms", "sdpa_ms", "speedup", "byte_ratio",
              "h1b_frac_of_copy", "sdpa_frac_of_copy", "h1b_eager_ms", "sdpa_eager_ms"]].copy()
    for col in ("h1b_ms", "sdpa_ms", "h1b_eager_ms", "sdpa_eager_ms"):
        out[col.replace("_ms", "_us")] = out.pop(col) * 1e3
    return out.sort_values(["B", "heads", "context", "variant"]).reset_index(drop=True)


def _context_ticks(g, df, column: str = "context") -> None:
    import matplotlib.ticker as mticker

    contexts = sorted(df[column].unique())
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(mticker.FixedLocator(contexts))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _: f"{x / 1024:.0f}k"))
        ax.xaxis.set_minor_locator(mticker.NullLocator())


def _long_times(df):
    import pandas as pd

    sdpa = df.drop_duplicates(["B", "heads", "context"]).assign(method="SDPA fp16 (flash)", time_us=lambda d: d.sdpa_ms * 1e3)
    h1b = df.assign(method=lambda d: "H1B " + d.variant, time_us=lambda d: d.h1b_ms * 1e3)
    return pd.concat([sdpa, h1b], ignore_index=True)


def plot_decode_times(df):
    """Decode time vs context, one panel per (batch, head layout), log-log."""
    import seaborn as sns

    g = sns.relplot(data=_long_times(df), x="context", y="time_us", hue="method", row="B", col="heads",
                    kind="line", marker="o", height=3.2, aspect=1.2, facet_kws={"sharey": False})
    g.set(yscale="log", xlabel="context (tokens)", ylabel="time per decode step (us)")
    _context_ticks(g, df)
    import matplotlib.ticker as mticker

    for ax in g.axes.flat:
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    g.figure.subplots_adjust(wspace=0.25)
    g.figure.suptitle(f"Decode attention on {df['device'].iloc[0]} (CUDA-graph time)", y=1.02)
    return g.figure


def plot_speedup(df):
    """H1B kernel speedup over SDPA fp16 vs context; dashed, in the same colour: the byte ratio, which is
    the speedup if both kernels ran at the same bandwidth."""
    import seaborn as sns

    variants = list(dict.fromkeys(df["variant"]))
    palette = dict(zip(variants, sns.color_palette(n_colors=len(variants))))
    g = sns.relplot(data=df, x="context", y="speedup", hue="variant", palette=palette, row="B", col="heads",
                    kind="line", marker="o", height=3.2, aspect=1.2)
    for (batch, heads), ax in g.axes_dict.items():  # the byte ratio depends on the head_dim: per panel
        ratios = df[(df["B"] == batch) & (df["heads"] == heads)].groupby("variant")["byte_ratio"].median()
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        for variant, ratio in ratios.items():
            ax.axhline(ratio, lw=0.8, ls="--", color=palette[variant], alpha=0.6)
    g.set(xlabel="context (tokens)", ylabel="speedup over SDPA (x)")
    _context_ticks(g, df)
    g.figure.suptitle("Speedup over SDPA fp16 (dashed: byte ratio, the bandwidth-bound ceiling)", y=1.02)
    return g.figure


def plot_bandwidth(df):
    """Achieved bandwidth on the bytes each kernel must move, as a share of a device-to-device copy."""
    import pandas as pd
    import seaborn as sns

    long = pd.concat([
        df.drop_duplicates(["B", "heads", "context"]).assign(method="SDPA fp16 (flash)", frac=lambda d: d.sdpa_frac_of_copy),
        df.assign(method=lambda d: "H1B " + d.variant, frac=lambda d: d.h1b_frac_of_copy),
    ], ignore_index=True)
    g = sns.relplot(data=long, x="context", y="frac", hue="method", row="B", col="heads", kind="line", marker="o",
                    height=3.2, aspect=1.2)
    g.set(ylim=(0, 1.05), xlabel="context (tokens)", ylabel="bandwidth / copy bandwidth")
    _context_ticks(g, df)
    g.figure.suptitle(f"Achieved bandwidth (copy: {df['copy_GBps'].iloc[0]:.0f} GB/s, read + write)", y=1.02)
    return g.figure


def plot_at_context(df, context: int):
    """Time per decode step at one ``context``: H1B variants beside SDPA, one group per (batch, heads)."""
    import seaborn as sns

    contexts = sorted(df["context"].unique())
    if context not in contexts:
        raise ValueError(f"context must be one of the benchmarked lengths {contexts}, got {context!r}")
    data = _long_times(df[df["context"] == context]).assign(case=lambda d: "B=" + d["B"].astype(str) + ", " + d["heads"])
    g = sns.catplot(data=data, x="case", y="time_us", hue="method", kind="bar", height=3.6, aspect=2.2)
    g.set(yscale="log", xlabel="", ylabel="time per decode step (us)")
    g.figure.suptitle(f"Decode step at {context // 1024}k tokens on {df['device'].iloc[0]}", y=1.03)
    return g.figure


# ---------------------------------------------------------------------------------------------------
# end to end: benchmarks/generate.py

GENERATE_METRICS = {"peak_over_weights_bytes": "peak memory over weights", "prefill_s": "prefill time",
                    "decode_tok_s": "decode tokens/s"}


def _label(row) -> str:
    """A row's cache and its settings: "dynamic", "h1b b=128 hamming", "h1b-graph b=128 hamming"...; with a chunked
    prefill (``prefill_chunk``) ", chunks of 8192" follows (its reference is DynamicCache chunked the same way)."""
    label = row["cache"]
    if str(label).startswith("h1b"):
        label = f"{label} b={int(row['bits'])} {row['score']}"
    chunk = row.get("prefill_chunk")
    return label if chunk is None or chunk != chunk else f"{label}, chunks of {int(chunk)}"


def load_generate_results(paths) -> "pandas.DataFrame":
    """Rows of ``benchmarks/generate.py`` JSON files (one or several), each with ``label`` (the cache and its
    settings) and, for every metric of ``GENERATE_METRICS``, ``<metric>_vs_dynamic``: its ratio to the
    DynamicCache row of the same model, batch and prompt length in the same file (NaN where that row ran
    out of memory). A file merging several calls tags each row with ``run_id``: the reference then also has
    the same ``run_id``."""
    import pandas as pd

    frames = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        result = json.loads(Path(path).read_text())
        df = pd.DataFrame(result["rows"])
        df["device"] = result.get("device")
        df["source"] = str(path)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["label"] = df.apply(_label, axis=1)
    if "run_id" not in df:
        df["run_id"] = ""
    df["run_id"] = df["run_id"].fillna("")
    key = ["source", "run_id", "model", "batch", "prompt_len"]  # a ratio's reference is from the same run
    dynamic = df[(df["cache"] == "dynamic") & ~df["oom"]].set_index(key)
    for metric in GENERATE_METRICS:
        ref = df.set_index(key).index.map(dynamic[metric].to_dict().get)
        df[f"{metric}_vs_dynamic"] = df[metric] / pd.Series(ref, index=df.index, dtype="float64")
    return df


def generate_table(df) -> "pandas.DataFrame":
    """The end-to-end table: per model, batch, prompt and cache, times, memory (GiB) and ratios to
    DynamicCache; out-of-memory rows say so."""
    out = df[["model", "batch", "prompt_len", "label", "oom", "prefill_s", "decode_tok_s", "syncs_per_decode_step",
              "prefill_s_vs_dynamic", "decode_tok_s_vs_dynamic", "peak_over_weights_bytes_vs_dynamic"]].copy()
    out["peak_GiB"] = df["peak_over_weights_bytes"] / 2**30
    out["cache_GiB"] = df["cache_bytes"] / 2**30
    return out.sort_values(["model", "batch", "prompt_len", "label"]).reset_index(drop=True)


def plot_generate_ratios(df):
    """H1BCache against DynamicCache in the same run, per metric (columns) and model (rows): ratio vs prompt
    length, one line per cache setting and batch. Above 1 is better for decode tokens/s, below 1 for
    memory and prefill time; DynamicCache rows that ran out of memory have no ratio."""
    import pandas as pd
    import seaborn as sns

    h1b = df[(df["cache"] != "dynamic") & ~df["oom"]]
    long = pd.concat([h1b.assign(metric=name, ratio=h1b[f"{metric}_vs_dynamic"])
                      for metric, name in GENERATE_METRICS.items()], ignore_index=True).dropna(subset=["ratio"])
    long["setting"] = long["label"] + ", B=" + long["batch"].astype(str)
    long["run"] = long["source"] + ":" + long["run_id"]  # one line per run: rows of two runs are not averaged
    g = sns.relplot(data=long, x="prompt_len", y="ratio", hue="setting", units="run", estimator=None, row="model",
                    col="metric", kind="line", marker="o", height=3.0, aspect=1.15, facet_kws={"sharey": False})
    for ax in g.axes.flat:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    g.set(xlabel="prompt (tokens)", ylabel="cache / DynamicCache")
    g.set_titles("{row_name}: {col_name}")
    _context_ticks(g, df, "prompt_len")
    g.figure.suptitle(f"generate() end to end on {df['device'].iloc[0]}: each cache / DynamicCache of the same run", y=1.02)
    return g.figure
