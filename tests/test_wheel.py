"""The wheel built from the repository works on its own.

Builds the sdist and, from it, the wheel (as ``python -m build`` does for a release),
installs the wheel into a fresh virtual environment that borrows only the third-party
packages of the running one, and trains from a folder outside the checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from torchvision.transforms.functional import to_pil_image

from bcnn.data.synthetic import SyntheticDataset
from tests.conftest import REPO_ROOT, subprocess_env

# What the build reads; copied so that building leaves nothing in the checkout.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "bcnn", "configs")
COMMANDS = (
    "bcnn-train",
    "bcnn-prepare-data",
    "bcnn-reproduce",
    "bcnn-eval",
    "bcnn-predict",
    "bcnn-export",
    "bcnn-viz",
    "bcnn-summarize-sweep",
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build(tmp: Path) -> tuple[Path, Path]:
    """Builds sdist and wheel from a copy of the sources; returns their paths."""
    src, dist = tmp / "src", tmp / "dist"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], tmp)
    (sdist,) = dist.glob("bcnn-*.tar.gz")
    (wheel,) = dist.glob("bcnn-*.whl")
    return sdist, wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed; returns its bin folder.

    It sees the running environment's site-packages through a path entry in a .pth file.
    Python adds such a folder to sys.path without running the .pth files inside it, so
    the editable install of bcnn there (an import hook started by its own .pth file)
    stays off; the wheel's bcnn comes first anyway.
    """
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
    )
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib.stdout.strip(), "borrowed.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    # --ignore-installed: the running environment's bcnn is visible; leave it alone.
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*pip, "--disable-pip-version-check", "--quiet", str(wheel)], tmp)
    return venv / "bin"


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path: Path, smoke_overrides) -> None:
    sdist, wheel = _build(tmp_path)

    configs = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml")}
    assert "configs/train.yaml" in configs and len(configs) > 20
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read("bcnn-0.1.0.dist-info/entry_points.txt").decode()
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "bcnn").rglob("*.py")}
    assert {f"bcnn/{name}" for name in configs} <= names, "configs missing from the wheel"
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert {"bcnn/py.typed", "bcnn-0.1.0.dist-info/licenses/LICENSE"} <= names
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "scripts/"))]
    assert not [n for n in names if "bench" in n], "benchmark code is not for users"
    for command in COMMANDS:
        assert f"{command} = bcnn." in entry_points
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert configs | {"setup.py", "LICENSE"} <= in_sdist, "the sdist cannot rebuild the wheel"

    bin_dir = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"  # an empty folder: no checkout on sys.path, no configs here
    work.mkdir()
    env = {k: v for k, v in subprocess_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1")
    where = _run(
        [str(bin_dir / "python"), "-c", "import bcnn, bcnn.configs; print(bcnn.__file__)"],
        work,
        env,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout

    run_dir = tmp_path / "run"
    _run(
        [str(bin_dir / "bcnn-train"), *smoke_overrides, f"hydra.run.dir={run_dir}"],
        work,
        env,
        timeout=300,
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 100
    assert (run_dir / "checkpoints" / "last.pt").stat().st_size > 0
    assert not list(work.iterdir()), "the run wrote into the working folder"

    # The trained model's users: predict on image files, evaluate, export.
    images = tmp_path / "images"
    images.mkdir()
    test_set = SyntheticDataset(split="test", test_size=2)
    for i in range(2):
        to_pil_image(test_set[i][0]).save(images / f"img{i}.png")
    preds = tmp_path / "preds.csv"
    predicted = _run(
        [
            str(bin_dir / "bcnn-predict"),
            str(run_dir),
            str(images),
            "--topk",
            "3",
            "--out",
            str(preds),
        ],
        work,
        env,
    )
    assert "img0.png" in predicted.stdout and "img1.png" in predicted.stdout
    assert len(preds.read_text().splitlines()) == 1 + 2 * 3
    evaluated = _run(
        [str(bin_dir / "bcnn-eval"), f"checkpoint={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}"],
        work,
        env,
    )
    assert "top-1" in evaluated.stdout and (tmp_path / "eval" / "confusion_matrix.png").is_file()
    export = tmp_path / "export"
    _run([str(bin_dir / "bcnn-export"), str(run_dir), "--out", str(export)], work, env)
    # (Predicting from the exported file: tests/test_cli_predict.py.)
    assert (export / "model.onnx").stat().st_size > 0
    assert not list(work.iterdir()), "a command wrote into the working folder"

    listing = _run([str(bin_dir / "bcnn-reproduce")], work, env)
    assert "nabirds" in listing.stdout
    manual = subprocess.run(
        [str(bin_dir / "bcnn-prepare-data"), "dataset=nabirds", f"root={tmp_path / 'nb'}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # NABirds has no public download: the command prints the manual steps and exits 1.
    assert manual.returncode == 1 and "bcnn-prepare-data dataset=nabirds" in manual.stdout
    summary = _run([str(bin_dir / "bcnn-summarize-sweep"), "--help"], work, env)
    assert "sweep_dir" in summary.stdout
    assert not list(work.iterdir()), "a command wrote into the working folder"
