"""Collecting sweeps, table reports and plots, on fake sweep directories (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bcnn.engine.curves import plot_training_curves
from bcnn.reproduce.collect import collect_runs, summarize_sweep, table_report
from bcnn.reproduce.tables import TABLES, published
from tests.conftest import load_script

_script = load_script


summarize_script = _script("summarize_sweep")


def _job(root: Path, name: str, overrides: list[str], results: dict | None = None) -> Path:
    """A job folder as Hydra and the trainer leave it."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
        pd.DataFrame(
            {"stage": ["linear", "linear"], "epoch": [1, 2], "seconds": [1.5, 2.5]}
        ).to_csv(job / "metrics.csv", index=False)
    return job


def _results(test: float, val: float | None = 50.0) -> dict:
    stage = {"test_acc": test, "test_mean_class_acc": test - 1, "val_acc": val, "best_epoch": 2}
    return {
        "test_acc": test,
        "test_mean_class_acc": test - 1,
        "val_acc": val,
        "val_mean_class_acc": val,
        "stages": {"linear": stage},
        "num_classes": 12,
        "dataset": "synthetic",
        "output_dir": "/elsewhere",
        "skipped_images": {"count": 0, "first": []},  # a list: unhashable for pandas
    }


def test_summarize_sweep_gives_one_row_per_job(tmp_path: Path) -> None:
    _job(tmp_path, "0", ["pooling=sum", "trainer.linear.lr=1.0"], _results(80.0))
    _job(tmp_path, "1", ["pooling=avg", "trainer.linear.lr=1.0"], _results(60.5, val=None))
    _job(tmp_path, "10", ["pooling=democratic", "+pooling.gamma=0.5"], _results(82.25))
    _job(tmp_path, "2", ["pooling=spectral"])  # failed: no results.json
    (tmp_path / "multirun.yaml").write_text("{}\n")

    df = summarize_sweep(tmp_path)

    assert list(df["job"]) == ["0", "1", "2", "10"]  # numeric job order
    assert list(df["status"]) == ["completed", "completed", "no results", "completed"]
    assert list(df["pooling"]) == ["sum", "avg", "spectral", "democratic"]
    assert df.loc[df["job"] == "10", "pooling.gamma"].item() == "0.5"
    assert df["test_acc"].tolist()[:2] == [80.0, 60.5] and math.isnan(df["test_acc"][2])
    assert df.loc[0, "stages.linear.test_acc"] == 80.0 and df.loc[0, "dataset_name"] == "synthetic"
    assert df.loc[0, "train_seconds"] == 4.0 and df.loc[0, "epochs_run"] == 2
    assert "output_dir" not in df.columns
    assert list(df.columns[:5]) == ["job", "status", "overrides", "pooling", "trainer.linear.lr"]
    assert pd.read_csv(tmp_path / "summary.csv")["test_acc"].notna().sum() == 3
    md = (tmp_path / "summary.md").read_text()
    assert "3 of 4 jobs completed" in md and "| 82.25 |" in md
    assert "| skipped_images.first |" in md  # its lists compared without hashing

    out = tmp_path / "elsewhere"
    assert summarize_script.main([str(tmp_path), str(out)]) == 0
    assert (out / "summary.csv").is_file()


def test_collect_runs_of_an_empty_directory(tmp_path: Path) -> None:
    df = collect_runs(tmp_path)
    assert df.empty and list(df.columns) == ["job", "status", "overrides"]


def test_table_report_puts_ours_next_to_published(tmp_path: Path) -> None:
    table = TABLES["bmvc17_table2"]
    first, second = table.rows[0], table.rows[4]
    # Jobs are matched to rows by folder name (the row id) ...
    _job(tmp_path, first.id, [f"experiment={first.id}"], _results(80.0))
    # ... or by the experiment override; a failed job leaves no results.
    _job(tmp_path, "7", [f"experiment={second.id}"], _results(91.0))
    _job(tmp_path, table.rows[1].id, [f"experiment={table.rows[1].id}"])

    report = table_report(table, tmp_path)

    assert len(report) == len(table.rows)
    assert {"ours", "published", "difference"} <= set(report.columns)
    by_id = report.set_index("row_id")
    assert by_id.loc[first.id, "ours"] == 80.0
    assert by_id.loc[first.id, "published"] == published(first.key)[0] == 78.1
    assert by_id.loc[first.id, "difference"] == pytest.approx(80.0 - 78.1)
    assert by_id.loc[second.id, "ours"] == 91.0 and by_id.loc[second.id, "job"] == "7"
    assert by_id.loc[table.rows[1].id, "status"] == "failed"
    assert (by_id["status"] == "not run").sum() == len(table.rows) - 3
    assert report["published"].notna().all()

    out = tmp_path / "report"
    md = (out / "bmvc17_table2.md").read_text()
    assert "| method | VGG-M CUB ours | VGG-M CUB paper | VGG-M CUB diff |" in md.replace("  ", " ")
    assert "| B-CNN | 80.0 | 78.1 | +1.9 |" in md
    for value in report["published"]:
        assert f"{value:.1f}" in md
    assert pd.read_csv(out / "bmvc17_table2.csv")["published"].notna().all()
    tex = (out / "bmvc17_table2.tex").read_text()
    assert r"\multicolumn{3}{c}{VGG-D Aircraft}" in tex and "+1.9" in tex
    assert (out / "bmvc17_table2.png").stat().st_size > 1000


def test_rows_repeated_over_splits_report_mean_and_sd(tmp_path: Path) -> None:
    # ECCV 2018 Tables 2-5: a DTD cell is ten jobs, one per official partition.
    table = TABLES["eccv18_tables2_5"]
    row = table.row("ts_plus_sum__dtd")
    assert row.job_ids[0] == "ts_plus_sum__dtd__split1" and len(row.job_ids) == 10
    for job_id, acc in zip(row.job_ids, (70.0, 72.0, 74.0)):
        _job(tmp_path, job_id, [f"experiment={job_id}"], _results(acc, val=None))
    _job(tmp_path, row.job_ids[3], [f"experiment={row.job_ids[3]}"])  # failed split
    mit = table.row("ts_plus_sum__mit_indoor")  # one split: no standard deviation
    _job(tmp_path, mit.id, [f"experiment={mit.id}"], _results(80.0, val=None))

    report = table_report(table, tmp_path).set_index("row_id")

    dtd = report.loc[row.id]
    assert (dtd["ours"], dtd["ours_std"], dtd["ours_splits"]) == (72.0, 2.0, 3)
    assert (dtd["published"], dtd["published_std"]) == (75.8, 0.7)
    assert dtd["difference"] == pytest.approx(72.0 - 75.8) and dtd["status"] == "ok"
    assert dtd["job"].split(";") == row.job_ids[:4]
    assert report.loc[mit.id, "ours"] == 80.0 and math.isnan(report.loc[mit.id, "ours_std"])
    assert report.loc["ts_plus_sum__fmd", "status"] == "not run"
    md = (tmp_path / "report" / "eccv18_tables2_5.md").read_text()
    assert "| method | DTD ours | DTD ours sd | DTD paper | DTD paper sd | DTD diff |" in md
    assert "| TS + sum | 72.0 | 2.0 | 75.8 | 0.7 | -3.8 |" in md
    assert "sample standard deviation" in md


def test_plot_training_curves_handles_stages_resumes_and_no_validation(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    pd.DataFrame(
        {
            "stage": ["linear", "linear", "linear", "finetune", "finetune"],
            "epoch": [1, 2, 2, 1, 2],  # epoch 2 logged twice: a resumed run
            "lr": [1.0, 1.0, 1.0, 0.1, 0.1],
            "train_loss": [2.0, 1.5, 1.4, 1.0, 0.8],
            "train_acc": [30.0, 50.0, 51.0, 60.0, 70.0],
            "val_acc": [float("nan")] * 3 + [55.0, 65.0],
            "val_mean_class_acc": [float("nan")] * 3 + [54.0, 64.0],
            "seconds": [1.0] * 5,
        }
    ).to_csv(metrics, index=False)
    out = plot_training_curves(metrics, tmp_path / "plots" / "curves.png")
    assert out.is_file() and out.stat().st_size > 1000


def test_timing_rows_read_the_benchmark_results(tmp_path: Path) -> None:
    # talk_newton_schulz's timing row: one 512x512 float32 root, batch 1, per method; the
    # Newton-Schulz forward is read from its lyapunov_iterative row.
    bench = tmp_path / "matrix_functions_cpu.csv"
    pd.DataFrame(
        [
            (512, 1, "float32", "newton_schulz", "autograd", 5, 9.0),
            (512, 1, "float32", "newton_schulz", "lyapunov_iterative", 5, 4.5),
            (512, 1, "float32", "newton_schulz", "lyapunov_iterative", 10, 8.0),
            (512, 1, "float32", "svd", "svd", 0, 30.0),
            (256, 1, "float32", "svd", "svd", 0, 3.0),  # another size: not read
        ],
        columns=["d", "batch", "dtype", "method", "backward", "iters", "fwd_median_ms"],
    ).to_csv(bench, index=False)
    report = table_report(TABLES["talk_newton_schulz"], tmp_path, bench=bench)
    times = report[report["label"] == "Time (ms)"].set_index("row_id")
    assert times.loc["time_ms__5", "ours"] == 4.5 and times.loc["time_ms__10", "ours"] == 8.0
    assert times.loc["time_ms__svd", "ours"] == 30.0
    assert times.loc["time_ms__svd", "status"] == "benchmark"
    assert times.loc["time_ms__0", "status"] == "no benchmark results"
    assert math.isnan(times.loc["time_ms__5", "difference"])  # not an accuracy
    md = (tmp_path / "report" / "talk_newton_schulz.md").read_text()
    assert str(bench) in md
