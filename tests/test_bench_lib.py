"""scripts/benchlib.py: timing, run description and result files shared by the benchmark scripts."""

from __future__ import annotations

import math
import time
from pathlib import Path

import benchlib as bench
import pytest
import torch

CPU = torch.device("cpu")


def test_time_runs_calls_warmup_then_runs_of_number_calls() -> None:
    calls = []
    timing = bench.time_runs(lambda: calls.append(1), CPU, runs=3, warmup=2, number=4)
    assert len(calls) == 2 + 3 * 4
    assert timing.runs == 3 and timing.number == 4
    assert timing.best <= timing.median <= max(timing.times)
    with pytest.raises(ValueError, match="runs >= 1"):
        bench.time_runs(lambda: None, CPU, runs=0)


def test_measure_stops_at_max_runs_and_reports_seconds_per_call() -> None:
    x = torch.randn(64, 64)
    timing = bench.measure(lambda: x @ x, CPU, budget_s=5.0, max_runs=3)
    assert timing.runs == 3
    assert timing.number >= 1 and 0 < timing.best < 0.1
    # A call slower than the budget is timed once, after the Timer's warm-up call.
    calls = []
    slow = bench.measure(lambda: calls.append(time.sleep(0.01)), CPU, budget_s=1e-6)
    assert slow.runs == 1 and slow.number == 1 and len(calls) == 2
    assert 0.01 <= slow.best < 1.0


def test_cpu_clock_counts_process_time_and_refuses_other_devices() -> None:
    assert bench.clock(CPU, "cpu")() >= 0
    with pytest.raises(ValueError, match="clock='wall'"):
        bench.clock(torch.device("cuda"), "cpu")
    with pytest.raises(ValueError, match="clock must be one of"):
        bench.clock(CPU, "gpu")


def test_deadline() -> None:
    assert not bench.Deadline(None).expired()
    assert bench.Deadline(0).expired()
    assert not bench.Deadline(3600).expired()


def test_csv_round_trip_with_meta(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": 0.5, "c": "x, y"}, {"a": 2, "b": math.nan, "c": ""}]
    path = bench.write_csv(tmp_path / "sub" / "r.csv", rows, ["a", "c"], {"command": "python x"})
    meta, back = bench.read_csv(path)
    assert meta == {"command": "python x"}
    assert back == [{"a": "1", "c": "x, y"}, {"a": "2", "c": ""}]
    _, plain = bench.read_csv(bench.write_csv(tmp_path / "p.csv", rows))
    assert list(plain[0]) == ["a", "b", "c"] and plain[1]["b"] == "nan"


def test_markdown_table_formats_numbers_and_missing_values() -> None:
    rows = [{"n": 3, "t": 1.23456, "e": 1.5e-7, "s": "32"}, {"n": 4, "t": math.nan, "e": ""}]
    lines = bench.markdown_table(rows, {"n": "N", "t": "T", "e": "E", "s": "S"}, {"e": ".1e"})
    assert lines[:2] == ["| N | T | E | S |", "|---|---|---|---|"]
    assert lines[2] == "| 3 | 1.23 | 1.5e-07 | 32 |"  # text stays text
    assert lines[3] == "| 4 | — | — | — |"


def test_update_readme_section_replaces_only_its_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nintro\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    bench.update_readme_section(readme, "A", "## A\n\nnew a\n")
    assert readme.read_text() == "# Results\n\nintro\n\n## A\n\nnew a\n\n## B\n\nkeep b\n"
    bench.update_readme_section(readme, "C", "## C\n\nc\n")
    assert readme.read_text().endswith("## B\n\nkeep b\n\n## C\n\nc\n")
    fresh = tmp_path / "new" / "README.md"
    bench.update_readme_section(fresh, "A", "## A\n\na\n")
    assert fresh.read_text() == "# Benchmark results\n\n## A\n\na\n"


def test_run_info_states_device_date_command_and_load(tmp_path: Path) -> None:
    info = bench.RunInfo.start(
        Path(bench.__file__).parents[1] / "scripts" / "x.py", ["--a", "b c"], CPU
    )
    assert info.command == "python scripts/x.py --a 'b c'"
    meta = info.finish().meta()
    assert meta["device"] == bench.describe_device(CPU) and bench.cpu_name() in meta["device"]
    assert meta["date"].endswith(" UTC") and torch.__version__ in meta["versions"]
    assert {"load average at start (1/5/15 min)", "wall time"} <= set(meta)
    path = bench.write_markdown(tmp_path / "r.md", "Title", info, ["body"])
    text = path.read_text()
    assert text.startswith("# Title\n\n- device: ")
    assert "- command: `python scripts/x.py --a 'b c'`" in text and text.endswith("body\n")
