"""scripts/bench_data.py: result files and the README section it replaces."""

from __future__ import annotations

import math
from pathlib import Path

import benchlib as bench
import pytest

from tests.conftest import load_script


def _load_script():
    return load_script("bench_data")


# torchvision.io's decoders warn of their deprecation in favour of torchcodec.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")
def test_bench_data_writes_rows_report_and_its_readme_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\n## Data loading\n\nold\n\n## Other\n\nkept\n")
    argv = ["--images", "4", "--repeats", "1", "--max-workers", "1", "--target", "100"]
    assert _load_script().main([*argv, "--out", str(tmp_path)]) == 0
    _, rows = bench.read_csv(tmp_path / "data_loading_cpu.csv")
    pipelines = {(r["pipeline"], r["decoder"], r["recipe"]) for r in rows}
    assert ("decode+augment", "PIL", "resize_crop") in pipelines
    assert ("DataLoader", "PIL", "short_side") in pipelines
    for r in rows:
        per_s = float(r["images_per_s"])
        assert per_s > 0
        assert int(r["workers_for_target"]) == math.ceil(100 / float(r["per_worker_images_per_s"]))
    text = readme.read_text()
    assert "old" not in text and text.count("## Data loading") == 1
    assert text.endswith("## Other\n\nkept\n")
    assert "Command: `python scripts/bench_data.py --images 4" in text
    md = (tmp_path / "data_loading_cpu.md").read_text()
    assert md.startswith("# Data loading throughput (CPU)\n\n- device: ")
