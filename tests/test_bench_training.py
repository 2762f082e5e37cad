"""scripts/bench_training.py runs end to end and writes its result files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.conftest import REPO_ROOT


def test_bench_training_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "scripts" / "bench_training.py"),
            "--device", "cpu", "--models", "small_bcnn", "--size", "32", "--batch", "4",
            "--steps", "1", "--warmup", "1", "--precision", "32",
            "--cache-model", "small_bcnn", "--cache-images", "16", "--cache-size", "32",
            "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "training_cpu.csv")
    assert list(rows["model"]) == ["small_bcnn"]
    assert (rows["train_img_s"] > 0).all() and (rows["infer_img_s"] > 0).all()
    assert rows["head_share_pct"].between(0, 100).all()
    cache = pd.read_csv(tmp_path / "training_cpu_cache.csv")
    assert cache["cached_stage_over_one_pass"].iloc[0] > 1.0
    text = (tmp_path / "training_cpu.md").read_text()
    assert "Command: `python" in text and "Date:" in text
