"""Gather the jobs of a sweep directory into DataFrames; write summaries and table reports.

Works on any multirun directory of ``train.py`` (one sub-folder per job, each with
``.hydra/overrides.yaml`` and, once finished, ``results.json``), at any depth:
:func:`collect_runs` (one row per job), :func:`summarize_sweep` (``summary.csv`` and
``summary.md``) and :func:`table_report` (a published table filled in with our numbers next
to the published ones, as Markdown, CSV, LaTeX and a PNG bar chart
(:func:`plot_comparison`); a timing row reads the
matrix-function benchmark results, :func:`benchmark_timings`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bcnn.engine.curves import figure
from bcnn.reproduce.launch import ROWS_DIR, read_manifest
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


def read_overrides(job_dir: str | Path) -> list[str]:
    """The task overrides Hydra recorded for a job (``[]`` when it recorded none)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def override_columns(overrides: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "+c=x", "~d"]`` -> ``{"a.b": "1", "c": "x", "d": "<deleted>"}``."""
    parts = [o.partition("=") for o in overrides]
    return {key.lstrip("+~"): value if sep else "<deleted>" for key, sep, value in parts}


def _run_record(root: Path, job: Path) -> dict[str, Any]:
    recorded = read_overrides(job)
    rec: dict[str, Any] = {
        "job": job.relative_to(root).as_posix(),
        "status": NO_RESULTS,
        "overrides": " ".join(recorded),
        **override_columns(recorded),
    }
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
    return rec


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of a sweep directory.

    Columns: ``job`` (folder relative to ``sweep_dir``), ``status`` (``completed`` or
    ``no results``), ``overrides``, one column per override key, the keys of
    ``results.json`` flattened with dots (its ``dataset`` as ``dataset_name``), and
    ``epochs_run`` and ``train_seconds`` from ``metrics.csv``.

    Args:
        sweep_dir: A multirun directory (``hydra.sweep.dir``).

    Returns:
        The DataFrame, in job order; empty (with ``job``, ``status``, ``overrides``) when
        the directory holds no job.
    """
    root = Path(sweep_dir)
    jobs = find_jobs(root)
    first = ["job", "status", "overrides"]
    if not jobs:
        return pd.DataFrame(columns=first)
    df = pd.DataFrame.from_records([_run_record(root, job) for job in jobs])
    keys = dict.fromkeys(k for job in jobs for k in override_columns(read_overrides(job)))
    overrides = [k for k in keys if k not in first]
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
    """A GitHub Markdown table of ``df`` (index included when it is named).

    Args:
        df: The table; MultiIndex columns are joined with spaces.
        formats: Format spec per (joined) column name, e.g. ``{"test_acc": ".2f"}``;
            other floats use ``.2f``. Missing values are left empty.
    """
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
    """Collects every job of a multirun into ``summary.csv`` and ``summary.md``.

    ``summary.csv`` holds every column; ``summary.md`` the columns whose values differ
    between the jobs, with those the whole sweep shares on one line above the table.

    Args:
        sweep_dir: The multirun directory.
        out_dir: Where to write (default: ``sweep_dir``).

    Returns:
        :func:`collect_runs`' DataFrame: one row per job.
    """
    df = collect_runs(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "summary.csv", index=False)
    # job, status, then the overrides and metrics; not the raw override list, per-stage
    # copies of the metrics, or what the jobs of a sweep rarely change.
    drop = {"overrides", "num_classes", "num_parameters"}
    shown = [c for c in df.columns if c not in drop and not c.startswith("stages.")]
    same = [c for c in shown[2:] if len(df) > 1 and df[c].nunique(dropna=False) == 1]
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
    the source checkout (None: there is none); ``device`` None: ``cuda`` if visible, else
    ``cpu``."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "benchmarks" / "results" / f"matrix_functions_{device}.csv"
        if path.is_file():
            return path
    return None


def benchmark_timings(path: str | Path) -> dict[tuple[str, int], float]:
    """Forward times (ms) of one 512x512 float32 square root, from a benchmark CSV.

    Args:
        path: A ``scripts/bench_matrix_functions.py`` results file (columns ``d``,
            ``batch``, ``dtype``, ``method``, ``backward``, ``iters``, ``fwd_median_ms``).

    Returns:
        ``(method, iters) -> ms`` for Newton-Schulz (the ``lyapunov_iterative`` row: the
        forward is the same whatever the backward) and ``("svd", 0)`` / ``("eigh", 0)``.

    Raises:
        ValueError: the file lacks a column it needs, naming it.
    """
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


NUMERIC = (
    "ours",
    "ours_std",
    "ours_splits",
    "published",
    "difference",
    "second",
    "published_std",
    "ours_mean_class_acc",
    "ours_val_acc",
)


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
    """The long report: one row per table row with ours, published and their difference.

    Columns: ``table, row_id, label, <table.column_names>, cell``, :data:`NUMERIC`,
    ``status, job``. ``ours`` is the run's test accuracy (%) (a timing row: the benchmark's
    ms; a row with splits: the mean over those that completed, with ``ours_std`` and
    ``ours_splits``), ``published`` the ``Row.key`` number, ``second`` the ``Row.paper``
    one where it differs. ``status``: ``ok``, ``failed``, ``not run``, ``not runnable:
    <reason>``, ``benchmark`` or ``no benchmark results``.

    Args:
        table: The table spec.
        runs: :func:`collect_runs` of its sweep.
        timings: :func:`benchmark_timings` for timing rows (None: left empty).
    """
    df = pd.DataFrame.from_records([_row_record(table, r, runs, timings or {}) for r in table.rows])
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col]) if col in df.columns else float("nan")
    first = ["table", "row_id", "label", *table.column_names, "cell"]
    return df[first + list(NUMERIC) + ["status", "job"]]


def paper_layout(report: pd.DataFrame, table: Table) -> pd.DataFrame:
    """The report as the paper lays it out: a row per label, (column, measure) columns.

    Measures: ``ours``, ``table.reference``, ``table.second`` where some cell has one,
    ``diff``; with splits also ``ours sd`` and ``<reference> sd``. Columns are the rows'
    column labels joined with spaces, in the table's order.
    """
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
    """Horizontal bars of our accuracy next to the published one for every table cell.

    Args:
        report: ``table_report``'s long DataFrame (columns ``cell``, ``ours``,
            ``published``); cells without a value get no bar.
        out_png: Where to write the figure; its folder is created.
        title: Figure title.

    Returns:
        ``out_png`` as a Path.
    """
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
    """Writes the report of a table's sweep: ``<table>.md``, ``.csv``, ``.tex`` and ``.png``.

    Args:
        table: The table spec.
        sweep_dir: Its sweep directory; jobs are matched to rows by folder name or
            ``experiment=`` override (the row id).
        out_dir: Where to write (default ``<sweep_dir>/report``).
        bench: Benchmark results for timing rows (default: :func:`find_benchmark`).

    Returns:
        :func:`report_frame`'s long DataFrame (what the CSV holds).
    """
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
    smoke = bool((read_manifest(sweep) or {}).get("smoke"))
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
    report: pd.DataFrame,
    wide: pd.DataFrame,
    sweep: Path,
    bench_path: Path | None,
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
    if bench_path is not None:
        lines += [f"Time (ms): forward of one 512x512 square root from `{bench_path}`.", ""]
    counts = report["status"].str.split(":").str[0].value_counts()
    fmts = {f"{c} {m}": "+.1f" if m == "diff" else ".1f" for c, m in wide.columns}
    lines += [
        markdown_table(wide, fmts),
        "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
    ]
    problems = report[~report["status"].isin(["ok", "benchmark"])]
    if len(problems):
        lines += ["", markdown_table(problems.set_index("cell")[["status"]]).rstrip("\n")]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"
