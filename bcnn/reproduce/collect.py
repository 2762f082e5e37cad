"""Gather the jobs of a sweep directory into DataFrames; write summaries and table reports.

Works on any multirun directory of ``train.py`` (one sub-folder per job, each with
``.hydra/overrides.yaml`` and, once finished, ``results.json``), at any depth.

* :func:`collect_runs`: one row per job with its overrides and metrics.
* :func:`summarize_sweep`: the same, written as ``summary.csv`` and ``summary.md``.
* :func:`table_report`: a published table (``bcnn.reproduce.tables``) filled in with our
  numbers next to the published ones, as Markdown, CSV, LaTeX and a PNG bar chart.
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
from bcnn.reproduce.tables import Table, published

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


def _job_for(row_id: str, runs: pd.DataFrame) -> pd.Series | None:
    if runs.empty:
        return None
    names = runs["job"].map(lambda j: Path(j).name)
    hit = runs[names == row_id]
    if hit.empty and "experiment" in runs.columns:
        hit = runs[runs["experiment"] == row_id]
    return None if hit.empty else hit.iloc[-1]


def report_frame(table: Table, runs: pd.DataFrame) -> pd.DataFrame:
    """The long report: one row per table row with ours, published and their difference.

    Columns: ``table, row_id, label, <table.column_names>, cell, ours, published,
    difference, published_std, ours_mean_class_acc, ours_val_acc, status, job``.
    ``ours`` is the test accuracy (%) of the run, ``difference`` = ours - published.
    ``status`` is ``ok``, ``failed`` (the job left no results) or ``not run``.
    """
    records = []
    for row in table.rows:
        top1, std = published(row.key)
        job = _job_for(row.id, runs)
        rec: dict[str, Any] = {"table": table.name, "row_id": row.id, "label": row.label}
        rec.update(zip(table.column_names, row.columns))
        rec["cell"] = " | ".join([row.label, *row.columns])
        ours = None
        if job is not None and job["status"] == COMPLETED:
            ours = float(job["test_acc"])
            rec["ours_mean_class_acc"] = job.get("test_mean_class_acc")
            rec["ours_val_acc"] = job.get("val_acc")
        status = "not run" if job is None else ("ok" if ours is not None else "failed")
        rec.update(
            ours=ours,
            published=top1,
            difference=None if ours is None or top1 is None else ours - top1,
            published_std=std,
            status=status,
            job=None if job is None else job["job"],
        )
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in (
        "ours",
        "published",
        "difference",
        "published_std",
        "ours_mean_class_acc",
        "ours_val_acc",
    ):
        if col not in df.columns:
            df[col] = float("nan")
        df[col] = pd.to_numeric(df[col])
    first = ["table", "row_id", "label", *table.column_names, "cell"]
    rest = [
        "ours",
        "published",
        "difference",
        "published_std",
        "ours_mean_class_acc",
        "ours_val_acc",
    ]
    return df[first + rest + ["status", "job"]]


def paper_layout(report: pd.DataFrame, table: Table) -> pd.DataFrame:
    """The report as the paper lays it out: a row per label, (column, measure) columns.

    Measures are ``ours``, ``paper`` and ``diff`` for every paper column (the row's
    column labels joined with spaces), in the table's order.
    """
    col = report[list(table.column_names)].astype(str).agg(" ".join, axis=1)
    long = report.assign(column=col)
    labels = list(dict.fromkeys(long["label"]))
    columns = list(dict.fromkeys(col))
    parts = {
        "ours": long.pivot(index="label", columns="column", values="ours"),
        "paper": long.pivot(index="label", columns="column", values="published"),
        "diff": long.pivot(index="label", columns="column", values="difference"),
    }
    wide = pd.concat(parts, axis=1).swaplevel(0, 1, axis=1)
    order = [(c, m) for c in columns for m in parts]
    wide = wide.reindex(index=labels, columns=pd.MultiIndex.from_tuples(order))
    wide.index.name = "method"
    return wide


def table_report(
    table: Table, sweep_dir: str | Path, out_dir: str | Path | None = None
) -> pd.DataFrame:
    """Writes the report of a table's sweep: ``<table>.md``, ``.csv``, ``.tex`` and ``.png``.

    Args:
        table: The table spec.
        sweep_dir: Its sweep directory (from ``scripts/reproduce.py``); jobs are matched
            to rows by folder name or ``experiment=`` override (the row id).
        out_dir: Where to write (default ``<sweep_dir>/report``).

    Returns:
        :func:`report_frame`'s long DataFrame (what the CSV holds).
    """
    sweep = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = report_frame(table, collect_runs(sweep))
    report.to_csv(out / f"{table.name}.csv", index=False)
    wide = paper_layout(report, table)
    manifest = read_manifest(sweep) or {}
    smoke = bool(manifest.get("smoke"))
    fmts = {f"{c} {m}": "+.1f" if m == "diff" else ".1f" for c, m in wide.columns}
    counts = report["status"].str.split(":").str[0].value_counts()
    lines = [f"# {table.title}", ""]
    if smoke:
        lines += [
            "> **SMOKE RUN**: synthetic data, a small CNN and a few CPU batches per row. "
            "The ours column only shows that every row runs; it is not comparable to "
            "the published numbers.",
            "",
        ]
    lines += [
        f"{table.description}. Sweep: `{sweep.resolve()}`.",
        "",
        "ours: top-1 test accuracy (%) of our run (best-validation epoch of the last "
        "stage); paper: published top-1 (`bcnn/resources/paper_results.csv`); "
        "diff = ours - paper. Empty: not run, failed or not published.",
        "",
        markdown_table(wide, fmts),
        "Rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
    ]
    problems = report[report["status"] != "ok"]
    if len(problems):
        lines += ["", "| cell | status |", "|:---|:---|"]
        lines += [_md_row(pair) for pair in zip(problems["cell"], problems["status"])]
    if table.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table.notes]
    (out / f"{table.name}.md").write_text("\n".join(lines) + "\n")
    caption = (
        table.title + (" (SMOKE RUN: not comparable)" if smoke else "") + ": ours vs published"
    )
    (out / f"{table.name}.tex").write_text(latex_table(wide, caption, f"tab:{table.name}"))
    plot_comparison(report, out / f"{table.name}.png", table.title + (" [smoke]" if smoke else ""))
    return report
