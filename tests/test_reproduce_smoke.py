"""The reproduction harness end to end: launch a table in smoke mode, then collect."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from tests.conftest import REPO_ROOT, run_train


def test_smoke_reproduce_nabirds_then_collect(tmp_path: Path) -> None:
    # The smallest table; its row is the two-stream B-CNN [D,M], so smoke mode must build
    # a two-stream small CNN. The published column is filled in although the data are fake.
    sweep = tmp_path / "sweep"
    script = [sys.executable, str(REPO_ROOT / "scripts" / "reproduce.py")]
    proc = run_train(
        ["table=nabirds", "smoke=true", "collect=true", f"sweep_dir={sweep}"],
        cwd=tmp_path,
        timeout=240,
        script=script,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    job = sweep / "b_cnn_d_m__nabirds"
    results = json.loads((job / "results.json").read_text())
    assert results["dataset"] == "synthetic" and 0 <= results["test_acc"] <= 100
    assert (
        job / ".hydra" / "overrides.yaml"
    ).read_text().strip() == "- experiment=b_cnn_d_m__nabirds"
    config = (job / "config.yaml").read_text()
    assert "TwoStream" in config and "SmallCNN" in config and "VGG16" not in config
    assert json.loads((sweep / "reproduce.json").read_text())["smoke"] is True

    report = sweep / "report"
    md = (report / "nabirds.md").read_text()
    assert "SMOKE RUN" in md and "| B-CNN [D,M] |" in md and "79.4" in md
    csv = pd.read_csv(report / "nabirds.csv")
    assert {"ours", "published", "difference"} <= set(csv.columns)
    assert csv.loc[0, "published"] == 79.4 and csv.loc[0, "status"] == "ok"
    assert csv.loc[0, "difference"] == csv.loc[0, "ours"] - 79.4
    assert (report / "nabirds.png").stat().st_size > 1000
    assert r"\multicolumn{3}{c}{NABirds}" in (report / "nabirds.tex").read_text()
