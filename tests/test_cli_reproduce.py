"""bcnn-reproduce as a Hydra application, and bcnn-summarize-sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from bcnn.cli.reproduce import reproduce, summarize_main
from bcnn.reproduce.tables import TABLES
from tests.conftest import REPO_ROOT, run_train


def reproduce_config(*overrides: str) -> DictConfig:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("reproduce", overrides=list(overrides))


def test_without_a_table_it_lists_them_and_refuses_bad_input(capsys) -> None:
    assert reproduce(reproduce_config()) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name}" in listing for name in TABLES)
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        reproduce(reproduce_config("table=nope"))
    with pytest.raises(ValueError, match="sweep_dir"):
        reproduce(reproduce_config("table=talk_nabirds", "launch=false"))


def test_added_keys_go_to_every_job_and_its_own_keys_stay(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["table=talk_fine_grained", "smoke=true", "dry_run=true", f"sweep_dir={sweep}"]
    args += ["rows=[fc_d__birds,fc_d__cars]", "launcher=joblib", "+trainer.device=cpu"]
    args += ["+hydra.launcher.n_jobs=2"]
    script = [sys.executable, str(REPO_ROOT / "scripts" / "reproduce.py")]
    proc = run_train(args, cwd=tmp_path, script=script, full_error=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    command = json.loads((sweep / "reproduce.json").read_text())["command"]
    assert command[command.index("--multirun") + 1] == "experiment=fc_d__birds,fc_d__cars"
    assert command[-3:] == [
        "hydra/launcher=joblib",
        "trainer.device=cpu",
        "hydra.launcher.n_jobs=2",
    ]
    assert not any(a.startswith(("smoke", "dry_run", "rows", "+")) for a in command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing else written


def _job(root: Path, name: str, overrides: list[str], acc: float) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = {"test_acc": acc, "dataset": "synthetic", "stages": {"linear": {"test_acc": acc}}}
    (root / name / "results.json").write_text(json.dumps(results))


def test_summaries_show_what_differs_and_name_what_is_shared(tmp_path: Path, capsys) -> None:
    _job(tmp_path, "0", ["pooling=sum", "trainer.linear.lr=1.0"], 80.0)
    _job(tmp_path, "1", ["pooling=avg", "trainer.linear.lr=1.0"], 60.5)
    out = tmp_path / "summary"
    assert summarize_main([str(tmp_path), str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert md == capsys.readouterr().out.removesuffix("\n")
    header, table = md.split("| job |")
    assert "Every job: trainer.linear.lr=1.0, dataset_name=synthetic" in header
    assert table.splitlines()[0] == " status | pooling | test_acc |"
    assert "| 1 | completed | avg | 60.50 |" in table
    full = pd.read_csv(out / "summary.csv")
    assert full["trainer.linear.lr"].tolist() == [1.0, 1.0]  # the CSV keeps every column
    assert summarize_main([str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err
