"""The reproduction harness end to end: smoke runs that tell rows apart, then the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from bcnn.cli.reproduce import reproduce
from bcnn.engine import train
from bcnn.reproduce import launch
from bcnn.reproduce.tables import TABLES
from tests.conftest import REPO_ROOT, compose_config, run_train


def _reproduce(overrides: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bcnn-reproduce *overrides`` in this process, its multirun of train.py forked from
    a warm interpreter (tests/_warm.py) rather than started anew.

    The command end to end, one new interpreter launching another, is
    test_smoke_report_of_iccv15_table1_differs_across_dataset_columns.
    """

    def run(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        proc = run_train([], cwd=cwd, timeout=400, script=cmd)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    monkeypatch.setattr(launch.subprocess, "run", run)
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("reproduce", overrides=overrides)
    assert reproduce(cfg) == 0


@pytest.mark.slow
def test_smoke_talk_table_tells_first_from_second_order_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two rows of the talk's fine-grained table: FC [D] (average pooling) and Bilinear
    # [D+M] (x_a x_b^T of a two-stream model: smoke mode builds two small CNNs). On the
    # built-in dataset, whose classes differ only in co-occurrences, the bilinear row
    # must score above the first-order one.
    sweep = tmp_path / "sweep"
    rows = ["fc_d__birds", "bilinear_d_plus_m__birds"]
    args = ["table=talk_fine_grained", "smoke=true", "collect=true", f"sweep_dir={sweep}"]
    _reproduce([*args, f"rows=[{','.join(rows)}]"], tmp_path, monkeypatch)

    acc = {}
    for row_id in rows:
        results = json.loads((sweep / row_id / "results.json").read_text())
        assert results["dataset"] == "synthetic"
        # The row's protocol: trainval, last epoch (no validation split).
        assert results["val_acc"] is None
        assert (
            results["stages"]["finetune"]["best_epoch"] == results["stages"]["finetune"]["epochs"]
        )
        acc[row_id] = results["test_acc"]
    assert acc["bilinear_d_plus_m__birds"] > acc["fc_d__birds"] + 5
    config = (sweep / "bilinear_d_plus_m__birds" / "config.yaml").read_text()
    assert "TwoStream" in config and "SmallCNN" in config and "VGG16" not in config

    report = sweep / "report"
    csv = pd.read_csv(report / "talk_fine_grained.csv").set_index("row_id")
    # The talk's number beside ours; the paper's (ICCV 2015) only where it differs.
    assert csv.loc["fc_d__birds", "published"] == 70.4 and pd.isna(csv.loc["fc_d__birds", "second"])
    assert (csv.loc["fc_d__aircraft", "published"], csv.loc["fc_d__aircraft", "second"]) == (
        76.6,
        74.1,
    )
    assert csv.loc["fv_d__cars", "status"] == "not run"  # runnable, not selected
    assert csv.loc["previous_work__cars", "status"].startswith("not runnable: another")
    assert csv.loc["bilinear_d_plus_m__birds", "ours"] == acc["bilinear_d_plus_m__birds"]
    md = (report / "talk_fine_grained.md").read_text()
    assert "SMOKE RUN" in md and "| method | Birds ours | Birds talk |" in md
    assert "| FC [D] |" in md and "74.1" in md and "issue 13" not in md
    assert json.loads((sweep / "reproduce.json").read_text())["smoke"] is True
    assert (report / "talk_fine_grained.png").stat().st_size > 1000


@pytest.mark.slow
def test_smoke_rows_with_different_normalizations_score_differently(tmp_path: Path) -> None:
    # The smoke versions of two rows of the talk's normalization table, trained in
    # process: B-CNN (signed sqrt, L2) and the matrix square root + signed sqrt + L2.
    table = TABLES["talk_normalization"]
    rows = [table.row("sgnsqrt__birds"), table.row("sqrta_plus_sgnsqrt__birds")]
    names = [job for job, _ in launch.write_rows(table, rows, tmp_path / "rows", smoke=True)]
    search = launch.searchpath_override(tmp_path / "rows")
    scores = []
    for name in names:
        cfg = compose_config([f"experiment={name}", search], output_dir=tmp_path / name)
        assert cfg.dataset.name == "synthetic" and list(cfg.trainer.stages) == ["linear"]
        scores.append(train(cfg)["test_acc"])
    assert scores[0] != scores[1]


@pytest.mark.slow
def test_smoke_of_the_new_tables_runs_lrbp_and_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BMVC 2017 Table 4's LRBP row (a projection and a low-rank classifier), and one ECCV
    # 2018 Tables 2-5 cell (compact pooling) repeated over two smoke splits (two synthetic
    # datasets): every job runs, the report gives the split mean and standard deviation.
    t4 = tmp_path / "t4"
    args = ["table=bmvc17_table4", "smoke=true", "collect=true", f"sweep_dir={t4}"]
    _reproduce([*args, "rows=lrbp*__cub"], tmp_path, monkeypatch)
    report = pd.read_csv(t4 / "report" / "bmvc17_table4.csv").set_index("row_id")
    assert report.loc["lrbp_vgg_d__cub", "status"] == "ok"
    assert 25 < report.loc["lrbp_vgg_d__cub", "ours"] <= 100  # 4 classes: above chance
    assert report.loc["cbp_tensor_sketch_8192_vgg_d__cub", "status"] == "not run"
    config = (t4 / "lrbp_vgg_d__cub" / "config.yaml").read_text()
    # The row's PCA projection to 100 keeps the small CNN's 8 channels (PCA's maximum).
    assert "LowRankBilinearClassifier" in config and "proj_dim: 8" in config
    assert "proj_init: pca" in config

    t25 = tmp_path / "t25"
    args = ["table=eccv18_tables2_5", "smoke=true", "collect=true", f"sweep_dir={t25}"]
    _reproduce([*args, "rows=ts_plus_gamma_democratic__dtd"], tmp_path, monkeypatch)
    cell = pd.read_csv(t25 / "report" / "eccv18_tables2_5.csv").set_index("row_id")
    cell = cell.loc["ts_plus_gamma_democratic__dtd"]
    accs = [
        json.loads((t25 / f"ts_plus_gamma_democratic__dtd__split{k}" / "results.json").read_text())[
            "test_acc"
        ]
        for k in (1, 2)
    ]
    assert cell["ours_splits"] == 2 and cell["ours"] == pytest.approx(sum(accs) / 2)
    assert cell["ours_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert (cell["published"], cell["published_std"]) == (76.2, 0.7)


@pytest.mark.slow
def test_smoke_report_of_iccv15_table1_differs_across_dataset_columns(tmp_path: Path) -> None:
    # B-CNN [M,M] without fine-tuning on three dataset columns: every column trains on its
    # own stand-in data, so the report's numbers differ between CUB, Cars and Aircraft
    # (CUB+box shares CUB's: test_smoke_columns_train_on_stand_ins_of_their_own).
    sweep = tmp_path / "sweep"
    script = [sys.executable, str(REPO_ROOT / "scripts" / "reproduce.py")]
    args = ["table=iccv15_table1", "smoke=true", "collect=true", f"sweep_dir={sweep}"]
    rows = "rows=[b_cnn_m_m__cub__nf,b_cnn_m_m__cars__nf,b_cnn_m_m__aircraft__nf]"
    proc = run_train([*args, rows], cwd=tmp_path, timeout=400, script=script)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = pd.read_csv(sweep / "report" / "iccv15_table1.csv").set_index("row_id")
    ours = {c: report.loc[f"b_cnn_m_m__{c}__nf", "ours"] for c in ("cub", "cars", "aircraft")}
    assert len(set(ours.values())) == 3, ours
    classes = {
        c: json.loads((sweep / f"b_cnn_m_m__{c}__nf" / "results.json").read_text())["num_classes"]
        for c in ours
    }
    assert sorted(classes.values()) == [4, 5, 6]
