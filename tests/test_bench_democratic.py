"""Smoke test of scripts/bench_democratic.py on tiny shapes (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import benchlib as bench

from bcnn.ops.democratic import factored_is_cheaper
from tests.conftest import load_script


def test_bench_script_times_both_routes_and_writes_its_files(tmp_path: Path) -> None:
    module = load_script("bench_democratic")
    out = tmp_path / "demo_cpu"
    argv = ["--batch", "2", "--shapes", "64x4", "8x16", "--budget-s", "0.001", "--out", str(out)]
    rows = module.main(argv)
    meta, records = bench.read_csv(out.with_suffix(".csv"))
    assert "bench_democratic.py --batch 2" in meta["command"] and meta["device"]
    assert [(int(r["n"]), int(r["d"])) for r in records] == [(64, 4), (8, 16)]
    for row in rows:
        assert row["gram_ms"] > 0 and row["factored_ms"] > 0
        picks = "factored" if factored_is_cheaper(row["n"], row["d"]) else "gram"
        assert row["auto"] == picks
    assert [r["auto"] for r in rows] == ["factored", "gram"]
    md = out.with_suffix(".md").read_text()
    assert "| n | d | d^2 / n |" in md and "auto picks" in md
