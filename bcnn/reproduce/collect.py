"""Gather the jobs of a sweep directory into DataFrames; write summaries and table reports.

Works on any multirun directory of ``train.py`` (one sub-folder per job, each with
``.hydra/overrides.yaml`` and, once finished, ``results.json``), at any depth.

* :func:`collect_runs`: one row per job with its overrides and metrics.
* :func:`summarize_sweep`: the same, written as ``summary.csv`` and ``summary.md``.
* :func:`table_report`: a published table (``bcnn.reproduce.tables``) filled in with our
  numbers next to the published ones, as Markdown, CSV, LaTeX and a PNG bar chart.
* :func:`benchmark_timings`: the matrix-function benchmark results of this machine, for
  the timing row of the talk's Newton-Schulz table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from bcnn.reproduce.launch import ROWS_DIR, read_manifest
from bcnn.reproduce.plots import plot_comparison
from bcnn.reproduce.tables import Row, Table, published

RESULT_KEYS = ("test_acc", "test_mean_class_acc", "val_acc", "val_mean_class_acc")
COMPLETED, NO_RESULTS = "completed", "no results"


# ---- gathering ----------------------------------------------------------------------------
def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job folders under ``sweep_dir``: those with ``results.json`` or ``.hydra/``."""
    root = Path(sweep_dir)
    jobs = {p.parent for p in root.rglob("results.json")}
    jobs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    jobs = {j for j in jobs if ROWS_DIR not in j.relative_to(root).parts}

    def order(path: Path) -> tuple:
        # Hydra's numbered job folders sort numerically (2 before 10).
        rel = path.relative_to(root).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel)

    return sorted(jobs, key=order)


def read_overrides(job_dir: str | Path) -> list[str]:
    """The task overrides Hydra recorded for a job (``[]`` when it recorded none)."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.load(path)]


def override_columns(overrides: Sequence[str]) -> dict[str, str]:
    """``["a.b=1", "+c=x", "~d"]`` -> ``{"a.b": "1", "c": "x", "d": "<deleted>"}``."""
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        out[key.lstrip("+~")] = value if sep else "<deleted>"
    return out


def _run_record(root: Path, job: Path) -> tuple[dict[str, Any], list[str]]:
    """The job's record and the keys of its overrides."""
    recorded = read_overrides(job)
    overrides = override_columns(recorded)
    rec: dict[str, Any] = {
        "job": job.relative_to(root).as_posix(),
        "status": NO_RESULTS,
        "overrides": " ".join(recorded),
    }
    rec.update(overrides)
    results_file = job / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        results.pop("output_dir", None)
        # Keep the group choice ``dataset=...`` (an override) apart from the dataset name.
        if "dataset" in results:
            results["dataset_name"] = results.pop("dataset")
        flat = pd.json_normalize(results, sep=".").iloc[0].to_dict()
        rec.update({k: v for k, v in flat.items() if k not in rec})
        rec["status"] = COMPLETED
    metrics = job / "metrics.csv"
    if metrics.is_file():
        m = pd.read_csv(metrics)
        if {"stage", "epoch", "seconds"} <= set(m.columns):
            m = m.drop_duplicates(["stage", "epoch"], keep="last")
            rec["epochs_run"] = len(m)
            rec["train_seconds"] = float(m["seconds"].sum())
    return rec, list(overrides)


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of a sweep directory.

    Columns: ``job`` (folder relative to ``sweep_dir``), ``status`` (``completed`` or
    ``no results``: failed, killed or still running), ``overrides`` (space-separated),
    one column per override key (its value as written), the keys of ``results.json``
    flattened with dots (``test_acc``, ..., ``stages.linear.test_acc``; its ``dataset`` as
    ``dataset_name``), and from ``metrics.csv`` ``epochs_run`` and ``train_seconds``.

    Args:
        sweep_dir: A multirun directory (``hydra.sweep.dir``).

    Returns:
        The DataFrame, in job order; empty (with ``job``, ``status``, ``overrides``) when
        the directory holds no job.
    """
    root = Path(sweep_dir)
    records, keys = [], {}
    for job in find_jobs(root):
        rec, job_keys = _run_record(root, job)
        records.append(rec)
        keys.update(dict.fromkeys(job_keys))
    first = ["job", "status", "overrides"]
    if not records:
        return pd.DataFrame(columns=first)
    df = pd.DataFrame.from_records(records)
    override_keys = [k for k in keys if k not in first]
    metrics = [k for k in RESULT_KEYS if k in df.columns]
    rest = [c for c in df.columns if c not in {*first, *override_keys, *metrics}]
    return df[first + override_keys + metrics + rest]


# ---- formatting ---------------------------------------------------------------------------
def _fmt(value: Any, fmt: str, missing: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return format(value, fmt)
    return str(value)


def _header_names(df: pd.DataFrame) -> list[str]:
    cols = df.columns
    if isinstance(cols, pd.MultiIndex):
        return [" ".join(str(p) for p in c if str(p)) for c in cols]
    return [str(c) for c in cols]


def markdown_table(df: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of ``df`` (index included when it is named).

    Args:
        df: The table; MultiIndex columns are joined with spaces.
        formats: Format spec per (joined) column name, e.g. ``{"test_acc": ".2f"}``;
            other floats use ``.2f``. Missing values are left empty.
    """
    formats = formats or {}
    names = _header_names(df)
    rows = [
        [_fmt(v, formats.get(n, ".2f"), "") for n, v in zip(names, r)]
        for r in df.itertuples(index=False)
    ]
    if df.index.name is not None or any(n is not None for n in df.index.names):
        names = [str(df.index.name or ""), *names]
        rows = [[str(i), *r] for i, r in zip(df.index, rows)]
    numeric = [
        all(_is_number(r[i]) for r in rows if r[i]) and any(r[i] for r in rows)
        for i in range(len(names))
    ]
    out = [_md_row(names)]
    out.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
    out += [_md_row(r) for r in rows]
    return "\n".join(out) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    # A "|" inside a cell (e.g. "label | column") would start a new column.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
    ):
        text = text.replace(a, b)
    return text


def latex_table(wide: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs LaTeX table of a report in the paper's layout (``paper_layout``).

    Written by hand rather than with ``DataFrame.to_latex`` so that the output does not
    depend on jinja2 and the grouped header (one ``\\multicolumn`` per paper column) is
    exactly as wanted.
    """
    groups = list(dict.fromkeys(c[0] for c in wide.columns))
    measures = [c[1] for c in wide.columns if c[0] == groups[0]]
    k = len(measures)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{_tex_escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{l" + "r" * (k * len(groups)) + "}",
        r"\toprule",
        " & ".join([""] + [rf"\multicolumn{{{k}}}{{c}}{{{_tex_escape(g)}}}" for g in groups])
        + r" \\",
        "".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(groups))),
        " & ".join([_tex_escape(str(wide.index.name or ""))] + measures * len(groups)) + r" \\",
        r"\midrule",
    ]
    for label_, row in wide.iterrows():
        cells = [_fmt(v, "+.1f" if m == "diff" else ".1f", "--") for (_, m), v in row.items()]
        lines.append(" & ".join([_tex_escape(str(label_)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---- summaries --------------------------------------------------------------------------------
def summarize_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> pd.DataFrame:
    """Collects every job of a multirun and writes ``summary.csv`` and ``summary.md``.

    Args:
        sweep_dir: The multirun directory.
        out_dir: Where to write (default: ``sweep_dir``).

    Returns:
        :func:`collect_runs`' DataFrame.
    """
    df = collect_runs(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "summary.csv", index=False)
    keep = [c for c in df.columns if c != "overrides" and not c.startswith("stages.")]
    keep = [c for c in keep if c not in ("num_classes", "num_parameters")]
    n_done = int((df["status"] == COMPLETED).sum()) if len(df) else 0
    text = f"# Sweep {Path(sweep_dir).resolve()}\n\n{n_done} of {len(df)} jobs completed.\n\n"
    if len(df):
        text += markdown_table(df[keep], {"train_seconds": ".0f", "epochs_run": ".0f"})
    (out / "summary.md").write_text(text)
    return df


BENCH_GLOB = "matrix_functions_*.csv"


def _bench_candidates() -> list[Path]:
    """Folders that may hold benchmark results: ./benchmarks/results and the checkout's."""
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return list(dict.fromkeys([Path.cwd() / "benchmarks" / "results", here]))


def find_benchmark(device: str | None = None) -> Path | None:
    """The matrix-function benchmark results of ``device`` (``cuda`` or ``cpu``).

    Args:
        device: Device type; None = ``cuda`` when a GPU is visible, else ``cpu``.

    Returns:
        ``benchmarks/results/matrix_functions_<device>.csv`` of the working directory or of
        the source checkout, or None when there is none.
    """
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for folder in _bench_candidates():
        path = folder / f"matrix_functions_{device}.csv"
        if path.is_file():
            return path
    return None


def benchmark_timings(path: str | Path) -> dict[tuple[str, int], float]:
    """Forward times (ms) of one 512x512 float32 square root, from a benchmark CSV.

    Args:
        path: A ``scripts/bench_matrix_functions.py`` results file (columns ``d``,
            ``batch``, ``dtype``, ``method``, ``backward``, ``iters``, ``fwd_median_ms``).

    Returns:
        ``(method, iters) -> ms`` for Newton-Schulz (each iteration count measured; the
        forward is the same whatever the backward, the ``lyapunov_iterative`` row is
        read) and ``("svd", 0)`` / ``("eigh", 0)``.

    Raises:
        ValueError: the file lacks a column it needs, naming it.
    """
    df = pd.read_csv(path)
    need = {"d", "batch", "dtype", "method", "backward", "iters", "fwd_median_ms"}
    if missing := sorted(need - set(df.columns)):
        raise ValueError(f"{path}: not a matrix-function benchmark file (no {missing})")
    df = df[(df["d"] == 512) & (df["batch"] == 1) & (df["dtype"] == "float32")]
    out: dict[tuple[str, int], float] = {}
    preferred = {"newton_schulz": "lyapunov_iterative", "svd": "svd", "eigh": "lyapunov_eig"}
    for method, backward in preferred.items():
        rows = df[df["method"] == method]
        for iters, group in rows.groupby("iters"):
            pick = group[group["backward"] == backward]
            pick = pick if len(pick) else group
            key = (method, int(iters) if method == "newton_schulz" else 0)
            out[key] = float(pick["fwd_median_ms"].iloc[0])
    return out


def _job_for(row_id: str, runs: pd.DataFrame) -> pd.Series | None:
    if runs.empty:
        return None
    names = runs["job"].map(lambda j: Path(j).name)
    hit = runs[names == row_id]
    if hit.empty and "experiment" in runs.columns:
        hit = runs[runs["experiment"] == row_id]
    return None if hit.empty else hit.iloc[-1]


def _jobs_for(row: Row, runs: pd.DataFrame) -> list[pd.Series]:
    """The jobs of a row found in ``runs``: one, or one per split that ran."""
    found = (_job_for(job_id, runs) for job_id in row.job_ids)
    return [job for job in found if job is not None]


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


def _second(row: Row, top1: float | None) -> float | None:
    """The row's second published number (``Row.paper``) where it differs from ``top1``."""
    value, _ = published(row.paper)
    if value is None or (top1 is not None and abs(value - top1) < 1e-9):
        return None
    return value


def report_frame(
    table: Table, runs: pd.DataFrame, timings: dict[tuple[str, int], float] | None = None
) -> pd.DataFrame:
    """The long report: one row per table row with ours, published and their difference.

    Columns: ``table, row_id, label, <table.column_names>, cell, ours, ours_std,
    ours_splits, published, difference, second, published_std, ours_mean_class_acc,
    ours_val_acc, status, job``. ``ours`` is the test accuracy (%) of the run (a timing
    row: the benchmark's milliseconds; a row with splits: the mean over the splits that
    completed, ``ours_std`` their sample standard deviation and ``ours_splits`` their
    number), ``published`` the number ``Row.key`` points at (the talk's, for the talk's
    tables), ``difference`` = ours - published, ``second`` the ``Row.paper`` number where it
    differs. ``status`` is ``ok`` (for a row with splits: at least one completed), ``failed``
    (no job left results), ``not run``, ``not runnable: <reason>``, or for a timing row
    ``benchmark`` / ``no benchmark results``.

    Args:
        table: The table spec.
        runs: :func:`collect_runs` of its sweep.
        timings: :func:`benchmark_timings` for timing rows (None: left empty).
    """
    records = []
    for row in table.rows:
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
            ours = (timings or {}).get(tuple(row.benchmark))
            status = "benchmark" if ours is not None else "no benchmark results"
        else:
            if done:
                acc = pd.Series([float(j["test_acc"]) for j in done])
                ours = float(acc.mean())
                rec["ours_mean_class_acc"] = float(
                    pd.Series([j.get("test_mean_class_acc") for j in done], dtype=float).mean()
                )
                rec["ours_val_acc"] = pd.Series(
                    [j.get("val_acc") for j in done], dtype=float
                ).mean()
                if row.splits:  # sample standard deviation, as MATLAB's std
                    rec["ours_std"] = float(acc.std(ddof=1)) if len(acc) > 1 else None
                    rec["ours_splits"] = len(done)
            status = "not run" if not jobs else ("ok" if ours is not None else "failed")
        rec.update(
            ours=ours,
            published=top1,
            difference=None if ours is None or top1 is None or row.benchmark else ours - top1,
            second=_second(row, top1),
            published_std=std,
            status=status,
            job=None if not jobs else ";".join(j["job"] for j in jobs),
        )
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in NUMERIC:
        if col not in df.columns:
            df[col] = float("nan")
        df[col] = pd.to_numeric(df[col])
    first = ["table", "row_id", "label", *table.column_names, "cell"]
    return df[first + list(NUMERIC) + ["status", "job"]]


def paper_layout(report: pd.DataFrame, table: Table) -> pd.DataFrame:
    """The report as the paper lays it out: a row per label, (column, measure) columns.

    Measures are ``ours``, the reference (``table.reference``: ``paper``, or ``talk``),
    the second reference (``table.second``) when some cell has one that differs, and
    ``diff`` = ours - reference, for every paper column (the row's column labels joined
    with spaces), in the table's order. A table with repeated rows (``Row.splits``) adds
    ``ours sd`` and ``<reference> sd``, the standard deviations over the splits.
    """
    col = report[list(table.column_names)].astype(str).agg(" ".join, axis=1)
    long = report.assign(column=col)
    labels = list(dict.fromkeys(long["label"]))
    columns = list(dict.fromkeys(col))
    parts = {"ours": long.pivot(index="label", columns="column", values="ours")}
    spread = any(r.splits for r in table.rows)
    if spread:
        parts["ours sd"] = long.pivot(index="label", columns="column", values="ours_std")
    parts[table.reference] = long.pivot(index="label", columns="column", values="published")
    if spread:
        parts[f"{table.reference} sd"] = long.pivot(
            index="label", columns="column", values="published_std"
        )
    if long["second"].notna().any():
        parts[table.second] = long.pivot(index="label", columns="column", values="second")
    parts["diff"] = long.pivot(index="label", columns="column", values="difference")
    wide = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1)
    order = [(c, m) for c in columns for m in parts]
    wide = wide.reindex(index=labels, columns=pd.MultiIndex.from_tuples(order))
    wide.index.name = "method"
    return wide


def table_report(
    table: Table,
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    bench: str | Path | None = None,
) -> pd.DataFrame:
    """Writes the report of a table's sweep: ``<table>.md``, ``.csv``, ``.tex`` and ``.png``.

    Args:
        table: The table spec.
        sweep_dir: Its sweep directory (from ``scripts/reproduce.py``); jobs are matched
            to rows by folder name or ``experiment=`` override (the row id).
        out_dir: Where to write (default ``<sweep_dir>/report``).
        bench: Matrix-function benchmark results for timing rows (default:
            :func:`find_benchmark` of this machine's device).

    Returns:
        :func:`report_frame`'s long DataFrame (what the CSV holds).
    """
    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    timings, bench_path = None, None
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
        table.title
        + (" (SMOKE RUN: not comparable)" if smoke else "")
        + f": ours vs {table.reference}"
    )
    (out / f"{table.name}.tex").write_text(latex_table(wide, caption, f"tab:{table.name}"))
    accuracy = report[~report["row_id"].isin({r.id for r in table.rows if r.benchmark})]
    plot_comparison(
        accuracy, out / f"{table.name}.png", table.title + (" [smoke]" if smoke else "")
    )
    return report


def _report_legend(table: Table, wide: pd.DataFrame) -> str:
    """What the columns of a report mean."""
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
    return legend


def _report_markdown(
    table: Table,
    report: pd.DataFrame,
    wide: pd.DataFrame,
    sweep: Path,
    bench_path: Path | None,
    smoke: bool,
) -> str:
    """The Markdown page of a report: title, legend, the table, row statuses, notes."""
    fmts = {f"{c} {m}": "+.1f" if m == "diff" else ".1f" for c, m in wide.columns}
    counts = report["status"].str.split(":").str[0].value_counts()
    lines = [f"# {table.title}", ""]
    if smoke:
        lines += [
            "> **SMOKE RUN**: the built-in synthetic dataset, a small CNN and the "
            "`debug=smoke` epochs on CPU. The ours column shows that every row runs and "
            "that rows differing in pooling or normalization score differently; it is not "
            "comparable to the published numbers.",
            "",
        ]
    legend = _report_legend(table, wide)
    lines += [f"{table.description}. Sweep: `{sweep.resolve()}`.", "", legend, ""]
    if bench_path is not None:
        lines += [f"Time (ms): forward of one 512x512 square root from `{bench_path}`.", ""]
    lines += [
        markdown_table(wide, fmts),
        "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
    ]
    problems = report[~report["status"].isin(["ok", "benchmark"])]
    if len(problems):
        lines += ["", "| cell | status |", "|:---|:---|"]
        lines += [_md_row(pair) for pair in zip(problems["cell"], problems["status"])]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines) + "\n"
