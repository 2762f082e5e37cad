"""bcnn-predict and bcnn-export on a trained run: probabilities per image file, bad files
reported by name, CSV/JSON output, and the exported models predicting like the run."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from bcnn.cli import export as export_cli
from bcnn.cli import predict as predict_cli
from bcnn.data.synthetic import SyntheticDataset
from bcnn.data.transforms import build_transforms
from bcnn.engine import train
from bcnn.engine.runs import load_trained
from tests.conftest import compose_config

GOOD = ("img0.png", "img1.png", "img2.png", "sub/gray.jpg")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    smoke = ["debug=smoke", "dataset.trainval_size=120", "dataset.test_size=60"]
    train(compose_config([*smoke, "trainer.stages=[linear]"], out))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three PNGs, a grayscale JPEG in a sub-folder, a truncated JPEG, a text file and a
    hidden folder."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    (folder / ".cache").mkdir()
    ds = SyntheticDataset(split="test", test_size=6)
    for i in range(3):
        to_pil_image(ds[i][0]).save(folder / f"img{i}.png")
    to_pil_image(ds[3][0]).convert("L").save(folder / "sub" / "gray.jpg")
    to_pil_image(ds[4][0]).save(folder / ".cache" / "thumb.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _eager_probs(run_dir: Path, files: list[Path], flip: bool = False) -> torch.Tensor:
    """The run's model on the files, through the run's (synthetic: no) eval transform."""
    trained = load_trained(run_dir)
    transform = build_transforms(None, augment=False)
    x = torch.stack([transform(predict_cli.read_image(f)) for f in files])
    with torch.no_grad():
        probs = trained.model(x).softmax(1)
        if flip:
            probs = (probs + trained.model(x.flip(-1)).softmax(1)) / 2
    return probs


def test_predicts_every_readable_image_and_names_the_bad_one(
    run_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preds.csv"
    status = predict_cli.main([str(run_dir), str(images), "--topk", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1  # one unreadable file; the others are predicted
    assert "broken.jpg" in captured.err and "1 of 5 images could not be read" in captured.err
    table = pd.read_csv(out)
    predicted = table[table["error"].isna()]
    assert sorted({Path(p).relative_to(images).as_posix() for p in predicted["image"]}) == sorted(
        GOOD
    )
    (bad,) = table[table["error"].notna()].itertuples()
    assert bad.image.endswith("broken.jpg") and "cannot read image" in bad.error
    probs = _eager_probs(run_dir, [images / g for g in GOOD])
    trained_classes = load_trained(run_dir).classes
    for i, name in enumerate(GOOD):
        rows = predicted[predicted["image"] == str(images / name)].sort_values("rank")
        assert list(rows["rank"]) == [1, 2, 3]
        top = probs[i].topk(3)
        assert list(rows["class"]) == [trained_classes[j] for j in top.indices]
        assert list(rows["index"]) == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor(rows["probability"].to_list()), top.values, atol=1e-6, rtol=0
        )
    # The terminal table: one line per image, the bad file included.
    assert "img0.png" in captured.out and "unreadable image" in captured.out


def test_json_output_with_flip_averaging(run_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.json"
    files = [images / "img0.png", images / "img1.png"]
    argv = [str(run_dir), *map(str, files), "--topk", "12", "--flip", "--out", str(out)]
    assert predict_cli.main(argv) == 0
    records = json.loads(out.read_text())
    assert [r["image"] for r in records] == [str(f) for f in files]
    expected = _eager_probs(run_dir, files, flip=True)
    for record, probs in zip(records, expected, strict=True):
        assert record["error"] is None and len(record["predictions"]) == 12
        got = torch.zeros(12)
        for p in record["predictions"]:
            got[p["index"]] = p["probability"]
        torch.testing.assert_close(got, probs, atol=1e-6, rtol=0)
        assert abs(float(got.sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_predicts_like_the_run(
    run_dir: Path, images: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    assert export_cli.main([str(run_dir), "--format", fmt, "--out", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "model card" in printed and "max |exported - eager (float64)|" in printed
    model_file = next(p for p in folder.iterdir() if p.name.startswith("model."))
    assert (folder / "README.md").is_file() and (folder / "bcnn_export.json").is_file()
    files = [images / g for g in GOOD]
    results = {}
    for source in (run_dir, model_file):
        out = tmp_path / f"{source.name}.json"
        assert predict_cli.main([str(source), *map(str, files), "--out", str(out)]) == 0
        results[source] = json.loads(out.read_text())
    for ours, theirs in zip(results[run_dir], results[model_file], strict=True):
        assert [p["class"] for p in ours["predictions"]] == [
            p["class"] for p in theirs["predictions"]
        ]
        for a, b in zip(ours["predictions"], theirs["predictions"], strict=True):
            assert abs(a["probability"] - b["probability"]) < 1e-5


def test_user_errors_print_one_message(
    run_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert predict_cli.main([str(tmp_path / "nowhere"), str(images)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bcnn-predict: error:") and "no such model" in err
    assert "Traceback" not in err
    # A missing file is reported by name like an unreadable one; the others are predicted.
    first = next(images.rglob("*.png"), None) or next(p for p in images.rglob("*") if p.is_file())
    assert predict_cli.main([str(run_dir), str(first), str(tmp_path / "missing.png")]) == 1
    captured = capsys.readouterr()
    assert "cannot read image" in captured.err and "missing.png" in captured.err
    assert str(first) in captured.out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_cli.main([str(run_dir), str(empty)]) == 1
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(run_dir), str(images), "--topk", "0"])
    assert exit_info.value.code == 2
    assert export_cli.main([str(tmp_path / "nowhere"), "--format", "onnx"]) == 1
    assert "checkpoints/best.pt" in capsys.readouterr().err


def _not_a_model(kind: str, folder: Path) -> Path:
    """A file that looks like a model bcnn reads and is not one."""
    if kind == "fake_torchscript":  # a zip with bcnn's metadata entry, but no TorchScript
        path = folder / "model.torchscript.pt"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model/extra/bcnn_export.json", json.dumps({"format": "torchscript"}))
            zf.writestr("model/data.pkl", b"garbage")
    elif kind == "plain_torchscript":  # TorchScript, but not from bcnn-export
        path = folder / "model.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    elif kind == "random_checkpoint":
        path = folder / "run" / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path = folder / "model.onnx"
        path.write_bytes(np.random.default_rng(1).bytes(512))
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("fake_torchscript", "is not a TorchScript model torch can load"),
        ("plain_torchscript", "a TorchScript model without bcnn metadata"),
        ("random_checkpoint", "is not a checkpoint"),
        ("corrupt_onnx", "is not an ONNX model"),
    ],
)
def test_a_file_that_is_not_a_model_is_named_in_one_message(
    kind: str, expected: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "corrupt_onnx":
        pytest.importorskip("onnx")
    path = _not_a_model(kind, tmp_path)
    model = path.parent.parent if kind == "random_checkpoint" else path  # a run directory
    assert predict_cli.main([str(model), str(images / "img0.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{predict_cli.PROG}: error: {path}") and expected in err
    assert "Traceback" not in err and "never holds" not in err and len(err.splitlines()) == 2
