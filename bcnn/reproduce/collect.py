"""The jobs of any ``train.py`` multirun directory as DataFrames (:func:`collect_runs`), its
summary (:func:`summarize_sweep`) and a published table's report (:func:`table_report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bcnn.engine.curves import figure
from bcnn.reproduce.launch import MANIFEST, ROWS_DIR
from bcnn.reproduce.tables import Row, Table, published

RESULT_KEYS = ("test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc")
COMPLETED, NO_RESULTS = "completed", "no results"


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job folders under ``sweep_dir`` (with ``results.json`` or ``.hydra/``), in order."""
    root = Path(sweep_dir)
    jobs = {p.parent for p in root.rglob("results.json")}
    jobs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}

    def order(path: Path) -> tuple:  # Hydra's numbered job folders: 2 before 10
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)

    rel = [j.relative_to(root) for j in jobs]
    return [root / j for j in sorted(rel, key=order) if ROWS_DIR not in j.parts]


def _run_record(root: Path, job: Path) -> tuple[dict[str, Any], list[str]]:
    """A job's row and its override columns (``+c=x`` -> ``c: x``, ``~d`` -> ``d: <deleted>``)."""
    path = job / ".hydra" / "overrides.yaml"
    recorded = [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
    parts = [o.partition("=") for o in recorded]
    overrides = {key.lstrip("+~"): value if sep else "<deleted>" for key, sep, value in parts}
    rec: dict[str, Any] = {"job": job.relative_to(root).as_posix(), "status": NO_RESULTS}
    rec |= {"overrides": " ".join(recorded), **overrides}
    if (job / "results.json").is_file():
        results = json.loads((job / "results.json").read_text())
        results.pop("output_dir", None)
        # Keep the group choice ``dataset=...`` (an override) apart from the dataset name.
        if "dataset" in results:
            results["dataset_name"] = results.pop("dataset")
        flat = pd.json_normalize(results, sep=".").iloc[0].to_dict()
        rec.update({k: v for k, v in flat.items() if k not in rec}, status=COMPLETED)
    if (job / "metrics.csv").is_file():
        m = pd.read_csv(job / "metrics.csv")
        if {"stage", "epoch", "seconds"} <= set(m.columns):
            m = m.drop_duplicates(["stage", "epoch"], keep="last")
            rec.update(epochs_run=len(m), train_seconds=float(m["seconds"].sum()))
    return rec, list(overrides)


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of a multirun directory, in job order.

    Columns: ``job`` (folder relative to ``sweep_dir``), ``status`` (``completed`` or
    ``no results``), ``overrides``, one column per override key, the keys of
    ``results.json`` flattened with dots (its ``dataset`` as ``dataset_name``), and
    ``epochs_run`` and ``train_seconds`` from ``metrics.csv``; only the first three when
    the directory holds no job.
    """
    root = Path(sweep_dir)
    jobs = find_jobs(root)
    first = ["job", "status", "overrides"]
    if not jobs:
        return pd.DataFrame(columns=first)
    records = [_run_record(root, job) for job in jobs]
    df = pd.DataFrame.from_records([rec for rec, _ in records])
    overrides = [k for k in dict.fromkeys(k for _, keys in records for k in keys) if k not in first]
    metrics = [k for k in RESULT_KEYS if k in df.columns]
    rest = [c for c in df.columns if c not in {*first, *overrides, *metrics}]
    return df[first + overrides + metrics + rest]


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt) if isinstance(value, float) else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of ``df`` (its index when named; MultiIndex columns joined
    with spaces); floats formatted by ``formats[column]`` (default ``.2f``), missing ones empty."""
    formats = formats or {}
    joined = isinstance(df.columns, pd.MultiIndex)
    names = [" ".join(str(p) for p in c if str(p)) if joined else str(c) for c in df.columns]
    rows = [
        [_fmt(v, formats.get(n, ".2f")) for n, v in zip(names, r)]
        for r in df.itertuples(index=False)
    ]
    if df.index.name is not None or any(n is not None for n in df.index.names):
        names = [str(df.index.name or ""), *names]
        rows = [[str(i), *r] for i, r in zip(df.index, rows)]
    right = [
        all(_is_number(r[i]) for r in rows if r[i]) and any(r[i] for r in rows)
        for i in range(len(names))
    ]
    # A "|" inside a cell (e.g. "label | column") would start a new column.
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in [names, *rows]]
    lines.insert(1, "|" + "|".join("---:" if r else ":---" for r in right) + "|")
    return "\n".join(lines) + "\n"


def latex_table(wide: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs LaTeX table of a report in the paper's layout (:func:`paper_layout`)."""
    formats = {c: "{:+.1f}" if c[1] == "diff" else "{:.1f}" for c in wide.columns}
    style = wide.style.format(formats, na_rep="--")
    style = style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    for a, b in (("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        caption = caption.replace(a, b)
    return style.to_latex(
        caption=caption, label=label, hrules=True, multicol_align="c", position="t",
        position_float="centering", column_format="l" + "r" * len(wide.columns),
    )  # fmt: skip


def summarize_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Writes :func:`collect_runs` of a multirun into ``out_dir`` (default: ``sweep_dir``):
    ``summary.csv`` (every column) and ``summary.md`` (the columns whose values differ between
    the jobs, those the jobs share on one line above the table); returns the DataFrame."""
    df = collect_runs(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "summary.csv", index=False)
    # job, status, then the overrides and metrics; not the raw override list, per-stage
    # copies of the metrics, or what the jobs of a sweep rarely change.
    drop = {"overrides", "num_classes", "num_parameters"}
    shown = [c for c in df.columns if c not in drop and not c.startswith("stages.")]
    # repr: list values (a searchpath override, per-stage lists in results) are not hashable.
    same = [c for c in shown[2:] if len(df) > 1 and df[c].map(repr).nunique() == 1]
    done = int((df["status"] == COMPLETED).sum()) if len(df) else 0
    text = f"# Sweep {Path(sweep_dir).resolve()}\n\n{done} of {len(df)} jobs completed.\n\n"
    if same:
        text += "Every job: " + ", ".join(f"{c}={df[c].iloc[0]}" for c in same) + "\n\n"
    if len(df):
        formats = {"train_seconds": ".0f", "epochs_run": ".0f"}
        text += markdown_table(df[[c for c in shown if c not in same]], formats)
    (out / "summary.md").write_text(text)
    return df


def find_benchmark(device: str | None = None) -> Path | None:
    """``benchmarks/results/matrix_functions_<device>.csv`` of the working directory or of
    the source checkout, if any (``device`` None: ``cuda`` if visible, else ``cpu``)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "benchmarks" / "results" / f"matrix_functions_{device}.csv"
        if path.is_file():
            return path
    return None


def benchmark_timings(path: str | Path) -> dict[tuple[str, int], float]:
    """Forward times (ms) of one 512x512 float32 square root, from the results file of
    ``scripts/bench_matrix_functions.py``: ``(method, iters) -> ms`` for Newton-Schulz (its
    ``lyapunov_iterative`` row: the forward is the same whatever the backward), ``("svd", 0)``
    and ``("eigh", 0)``. A ValueError names a column the file lacks."""
    df = pd.read_csv(path)
    need = {"d", "batch", "dtype", "method", "backward", "iters", "fwd_median_ms"}
    if missing := sorted(need - set(df.columns)):
        raise ValueError(f"{path}: not a matrix-function benchmark file (no {missing})")
    df = df[(df["d"] == 512) & (df["batch"] == 1) & (df["dtype"] == "float32")]
    preferred = {"newton_schulz": "lyapunov_iterative", "svd": "svd", "eigh": "lyapunov_eig"}
    df = df[df["method"].isin(preferred)].assign(pick=df["backward"] == df["method"].map(preferred))
    df = df.sort_values("pick", ascending=False, kind="stable").drop_duplicates(["method", "iters"])
    return {
        (m, int(i) if m == "newton_schulz" else 0): float(ms)
        for m, i, ms in zip(df["method"], df["iters"], df["fwd_median_ms"])
    }


def _jobs_for(row: Row, runs: pd.DataFrame) -> list[pd.Series]:
    """The jobs of a row found in ``runs`` (by folder name or ``experiment=`` override):
    one, or one per split that ran."""
    if runs.empty:
        return []
    names = runs["job"].map(lambda j: Path(j).name)
    found = []
    for job_id in row.job_ids:
        hit = runs[names == job_id]
        if hit.empty and "experiment" in runs.columns:
            hit = runs[runs["experiment"] == job_id]
        found += [] if hit.empty else [hit.iloc[-1]]
    return found


NUMERIC: tuple[str, ...] = ("ours", "ours_std", "ours_splits", "published", "difference")
NUMERIC += ("second", "published_std", "ours_mean_class_acc", "ours_val_acc")


def _row_record(table: Table, row: Row, runs: pd.DataFrame, timings: dict) -> dict[str, Any]:
    top1, std = published(row.key)
    jobs = _jobs_for(row, runs) if row.runnable else []
    done = [j for j in jobs if j["status"] == COMPLETED]
    rec: dict[str, Any] = {"table": table.name, "row_id": row.id, "label": row.label}
    rec.update(zip(table.column_names, row.columns))
    rec["cell"] = " | ".join([row.label, *row.columns])
    ours = None
    if row.reason is not None:
        status = f"not runnable: {row.reason}"
    elif row.benchmark is not None:
        ours = timings.get(tuple(row.benchmark))
        status = "benchmark" if ours is not None else "no benchmark results"
    else:
        if done:
            acc = pd.Series([float(j["test_acc"]) for j in done])
            ours = float(acc.mean())
            for key in ("test_mean_class_acc", "val_acc"):
                mean = pd.Series([j.get(key) for j in done], dtype=float).mean()
                rec[f"ours_{key.removeprefix('test_')}"] = mean
            if row.splits:  # sample standard deviation, as MATLAB's std
                rec["ours_std"] = float(acc.std(ddof=1)) if len(acc) > 1 else None
                rec["ours_splits"] = len(done)
        status = "not run" if not jobs else ("ok" if ours is not None else "failed")
    second, _ = published(row.paper)  # shown only where it differs from the reference
    if second is not None and top1 is not None and abs(second - top1) < 1e-9:
        second = None
    rec.update(
        ours=ours,
        published=top1,
        difference=None if ours is None or top1 is None or row.benchmark else ours - top1,
        second=second,
        published_std=std,
        status=status,
        job=";".join(j["job"] for j in jobs) or None,
    )
    return rec


def report_frame(
    table: Table, runs: pd.DataFrame, timings: dict[tuple[str, int], float] | None = None
) -> pd.DataFrame:
    """The long report of ``table`` from :func:`collect_runs` ``runs`` and the timing rows'
    :func:`benchmark_timings`: one row per table row, columns ``table, row_id, label,
    <table.column_names>, cell``, :data:`NUMERIC`, ``status, job`` (docs/reproduce.md)."""
    df = pd.DataFrame.from_records([_row_record(table, r, runs, timings or {}) for r in table.rows])
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col]) if col in df.columns else float("nan")
    first = ["table", "row_id", "label", *table.column_names, "cell"]
    return df[first + list(NUMERIC) + ["status", "job"]]


def paper_layout(report: pd.DataFrame, table: Table) -> pd.DataFrame:
    """The report as the paper lays it out: a row per label, (column, measure) columns.
    Measures: ``ours``, ``table.reference``, ``table.second`` where some cell has one, ``diff``;
    with splits also ``ours sd`` and ``<reference> sd``."""
    col = report[list(table.column_names)].astype(str).agg(" ".join, axis=1)
    long = report.assign(column=col)
    spread = any(r.splits for r in table.rows)
    measures = {"ours": "ours", "ours sd": "ours_std" if spread else None}
    measures |= {table.reference: "published"}
    measures |= {f"{table.reference} sd": "published_std" if spread else None}
    if long["second"].notna().any():
        measures[table.second] = "second"
    measures["diff"] = "difference"
    parts = {
        m: long.pivot(index="label", columns="column", values=v) for m, v in measures.items() if v
    }
    wide = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1)
    order = [(c, m) for c in dict.fromkeys(col) for m in parts]
    wide = wide.reindex(
        index=list(dict.fromkeys(long["label"])), columns=pd.MultiIndex.from_tuples(order)
    )
    wide.index.name = "method"
    return wide


def plot_comparison(report: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Writes horizontal bars of ``ours`` next to ``published`` for every ``cell`` of a
    :func:`report_frame` to ``out_png`` (its folder created) and returns its path."""
    n = len(report)
    fig = figure(8, 1.2 + 0.28 * max(n, 1))
    ax = fig.subplots()
    y = np.arange(n)
    h = 0.4
    ax.barh(y - h / 2, report["published"].astype(float), h, label="published", color="C7")
    ax.barh(y + h / 2, report["ours"].astype(float), h, label="ours", color="C0")
    ax.set_yticks(y, report["cell"], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def table_report(
    table: Table,
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    bench: str | Path | None = None,
) -> pd.DataFrame:
    """Writes the report of a table's sweep into ``out_dir`` (default ``<sweep_dir>/report``):
    ``<table>.md``, ``.csv`` (:func:`report_frame`, returned), ``.tex`` and ``.png``. Jobs are
    matched to rows by folder name or ``experiment=`` override (the row id); timing rows read
    ``bench`` (default: :func:`find_benchmark`)."""
    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    bench_path = None
    if any(r.benchmark for r in table.rows):
        bench_path = Path(bench) if bench is not None else find_benchmark()
    timings = benchmark_timings(bench_path) if bench_path is not None else None
    report = report_frame(table, collect_runs(sweep), timings)
    report.to_csv(out / f"{table.name}.csv", index=False)
    wide = paper_layout(report, table)
    manifest = sweep / MANIFEST
    smoke = manifest.is_file() and bool(json.loads(manifest.read_text()).get("smoke"))
    markdown = _report_markdown(table, report, wide, sweep, bench_path, smoke)
    (out / f"{table.name}.md").write_text(markdown)
    caption = (
        f"{table.title}{' (SMOKE RUN: not comparable)' if smoke else ''}: ours vs {table.reference}"
    )
    (out / f"{table.name}.tex").write_text(latex_table(wide, caption, f"tab:{table.name}"))
    accuracy = report[~report["row_id"].isin({r.id for r in table.rows if r.benchmark})]
    plot_comparison(
        accuracy, out / f"{table.name}.png", table.title + (" [smoke]" if smoke else "")
    )
    return report


def _report_markdown(
    table: Table,
    long: pd.DataFrame,
    wide: pd.DataFrame,
    sweep: Path,
    bench: Path | None,
    smoke: bool,
) -> str:
    """The Markdown page of a report: title, legend, the table, row statuses, notes."""
    ref = table.reference
    legend = (
        "ours: top-1 test accuracy (%) of our run (the last stage's selected epoch: the "
        "last one when the preset trains on trainval, else the best validation epoch); "
        f"{ref}: the {ref}'s top-1 (`bcnn/resources/paper_results.csv`)"
    )
    if table.second != ref and table.second in {m for _, m in wide.columns}:
        legend += f"; {table.second}: the other published number where it differs"
    legend += f"; diff = ours - {ref}. Empty: not run, failed, not runnable or not published."
    if any(r.splits for r in table.rows):
        legend += (
            " Rows repeated over splits: ours is the mean over the splits that completed "
            "(their number: column `ours_splits` of the CSV), sd the sample standard "
            "deviation; the published sd where the paper prints one."
        )
    lines = [f"# {table.title}", ""]
    if smoke:
        lines += [
            "> **SMOKE RUN**: stand-ins of the datasets (the built-in synthetic one), a small "
            "CNN and the `debug=smoke` epochs on CPU. The ours column shows that every row "
            "runs and that rows and columns are different runs; it is not comparable to the "
            "published numbers.",
            "",
        ]
    lines += [f"{table.description}. Sweep: `{sweep.resolve()}`.", "", legend, ""]
    if bench is not None:
        lines += [f"Time (ms): forward of one 512x512 square root from `{bench}`.", ""]
    counts = long["status"].str.split(":").str[0].value_counts()
    fmts = {f"{c} {m}": "+.1f" if m == "diff" else ".1f" for c, m in wide.columns}
    lines += [
        markdown_table(wide, fmts),
        "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
    ]
    problems = long[~long["status"].isin(["ok", "benchmark"])]
    if len(problems):
        lines += ["", markdown_table(problems.set_index("cell")[["status"]]).rstrip("\n")]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"
