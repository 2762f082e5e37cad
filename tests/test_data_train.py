"""One short training run per dataset, on its miniature fixture (in-process: the command
line itself is tested elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.datasets import MAKERS, build, make_folder

from bcnn.data.custom import FolderDataset
from bcnn.engine import train
from tests.conftest import compose_config, run_train


def smoke_run(run_dir: Path, *overrides: str) -> dict:
    """Trains at smoke size with the small CNN on 32-pixel crops; the run's results.json."""
    cfg = compose_config(
        [*overrides, "debug=smoke", "backbone=small", "dataset.transform.size=32"], run_dir
    )
    train(cfg)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_smoke_training_run(tmp_path: Path, name: str) -> None:
    truth = MAKERS[name](tmp_path / "data")
    run_dir = tmp_path / "run"
    results = smoke_run(run_dir, f"dataset={name}", f"dataset.root={truth.root}")
    assert results["dataset"] == name and results["num_classes"] == len(truth.classes)
    # The trainer saves each split's image list: the test list is the official test set
    # (FMD has none: its seeded split is the loader's own).
    expected = truth.test or build(name, root=str(truth.root), split="test").records
    lines = (run_dir / "splits" / "test.txt").read_text().splitlines()
    assert sorted(line.rsplit(" ", 1) for line in lines) == sorted(
        [p, str(label)] for p, label, *_ in expected
    )


@pytest.mark.slow
def test_smoke_training_run_on_own_folder(tmp_path: Path) -> None:
    """dataset=folder on a single class-folder tree: test and val are carved and recorded."""
    truth = make_folder(tmp_path / "photos", "tree")
    run_dir = tmp_path / "run"
    overrides = ("dataset=folder", f"dataset.root={truth.root}", "dataset.name=my_birds")
    results = smoke_run(run_dir, *overrides)
    assert results["dataset"] == "my_birds" and results["num_classes"] == len(truth.classes)
    written = {
        split: [
            tuple(line.rsplit(" ", 1))
            for line in (run_dir / "splits" / f"{split}.txt").read_text().splitlines()
        ]
        for split in ("train", "val", "test")
    }
    listed = [pair for pairs in written.values() for pair in pairs]
    assert sorted(listed) == sorted((p, str(label)) for p, label in truth.train)  # a partition
    assert {label for _, label in written["test"]} == {"0", "1", "2"}  # stratified


@pytest.mark.slow
def test_a_bad_image_read_by_a_worker_stops_the_run_with_one_line(tmp_path: Path) -> None:
    truth = make_folder(tmp_path / "photos", "tree")
    (truth.root / "crow" / "img_00.jpg").write_bytes(b"\xff\xd8 not an image")
    ds = FolderDataset(truth.root, "trainval")
    with pytest.raises(OSError) as in_process:  # what the same file says without workers
        ds[[r.path for r in ds.records].index("crow/img_00.jpg")]
    args = ["dataset=folder", f"dataset.root={truth.root}", "debug=smoke", "backbone=small"]
    args += ["dataset.transform.size=32", "trainer.num_workers=2"]
    # A new interpreter: forked from the warm one, the loader's workers outlive the error by
    # the loader's 5-second join timeout each.
    proc = run_train([*args, f"hydra.run.dir={tmp_path / 'run'}"], full_error=False, warm=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        f"bcnn-train: error: {in_process.value}"
    ]
