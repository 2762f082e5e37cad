"""Smoke test of scripts/bench_matrix_functions.py on a tiny grid (no timing assertions)."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import load_script


def _load_script():
    return load_script("bench_matrix_functions")


def test_bench_script_writes_csv_markdown_and_plot(tmp_path: Path) -> None:
    bench = _load_script()
    out = tmp_path / "mf_cpu"
    argv = ["--device", "cpu", "--dims", "8", "--batches", "2", "--dtypes", "float64"]
    argv += ["--iters", "0", "1", "5", "--repeats", "1", "--budget-s", "0.001", "--out", str(out)]
    rows = bench.main(argv)
    with open(out.with_suffix(".csv")) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) > 0
    methods = {(r["method"], r["backward"]) for r in records}
    assert ("newton_schulz", "autograd") in methods and ("svd", "svd") in methods
    assert ("matmul_floor", "lyapunov_iterative") in methods and ("auto", "auto") in methods
    exact = [r for r in records if r["method"] == "eigh"]
    assert all(float(r["rel_err"]) < 1e-12 for r in exact)
    ns = {
        int(r["iters"]): float(r["rel_err"])
        for r in records
        if r["method"] == "newton_schulz" and r["backward"] == "lyapunov_iterative"
    }
    assert ns[5] < ns[1] < ns[0]
    md = out.with_suffix(".md").read_text()
    assert "Iterations vs time" in md and "Lin & Maji" not in md.split("Other published")[0]
    assert "msubhransu/matrix-sqrt README" in md  # published rows read from bcnn/resources
    assert "- command: `python scripts/bench_matrix_functions.py --device cpu --dims 8" in md
    assert "- device: " in md and "- date: " in md
    assert all(int(r["timed_runs"]) == 1 for r in records)  # --repeats 1
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_script_deadline_measures_the_first_shape_and_lists_the_rest(
    tmp_path: Path,
) -> None:
    bench = _load_script()
    out = tmp_path / "mf_cpu"
    argv = ["--device", "cpu", "--dims", "8", "12", "--batches", "2", "--dtypes", "float64"]
    argv += ["--iters", "5", "--repeats", "1", "--budget-s", "0.001", "--deadline-s", "0"]
    rows = bench.main([*argv, "--no-plot", "--out", str(out)])
    assert {(r.d, r.batch) for r in rows} == {(8, 2)}
    md = out.with_suffix(".md").read_text()
    assert "not started before --deadline-s 0.0): float64 d=12 batch=2" in md
    assert not out.with_suffix(".png").exists()
