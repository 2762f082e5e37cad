"""Reading images of every mode as upright 8-bit RGB within size limits, and totalling
skipped images across workers."""

from __future__ import annotations

import gc
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures.datasets import PALETTE, nearest_label, write_image
from fixtures.images import write_png_header, write_sideways_jpeg, write_unusual_images
from PIL import Image
from torch.utils.data import DataLoader

from bcnn.data.base import Record, RecordDataset
from bcnn.data.images import MAX_ASPECT_RATIO, MAX_PIXELS, BadImageError, open_rgb, to_8bit
from bcnn.errors import is_user_error, message


def test_unusual_modes_convert_to_the_expected_rgb(tmp_path: Path) -> None:
    cases = write_unusual_images(tmp_path)
    for name, (path, expected) in cases.items():
        image = open_rgb(path)
        assert image.mode == "RGB", name
        row = [image.getpixel((x, 0)) for x in range(len(expected))]
        # JPEG (the CMYK case) is lossy; the lossless formats must match to the unit.
        tolerance = 6 if name.endswith(".jpg") else 0
        assert np.abs(np.subtract(row, expected)).max() <= tolerance, (name, row, expected)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(64, dtype=np.uint32) * 1040).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as raw:
        assert raw.mode == "I;16"
        clipped = np.asarray(raw.convert("RGB"))  # what PIL alone gives: nearly all white
    image = np.asarray(open_rgb(tmp_path / "ramp.png"))
    assert (clipped == 255).mean() > 0.9
    assert np.array_equal(image[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert image[..., 0].min() == 0 and image[..., 0].max() == round(63 * 1040 / 257)


def test_to_8bit_falls_back_to_the_value_range() -> None:
    wide = Image.fromarray(np.array([[-1000, 0, 3000]], dtype=np.int32))
    assert list(np.asarray(to_8bit(wide))[0]) == [0, 64, 255]
    hot = Image.fromarray(np.array([[0.0, 150.0, 255.0]], dtype=np.float32))
    assert list(np.asarray(to_8bit(hot))[0]) == [0, 150, 255]


def test_unreadable_files_raise_bad_image_error_naming_them(tmp_path: Path) -> None:
    (tmp_path / "text.jpg").write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    for name in ("text.jpg", "cut.jpg", "absent.jpg"):
        with pytest.raises(BadImageError, match=name):
            open_rgb(tmp_path / name)


def _dataset_with_bad_images(folder: Path, bad: set[int], n: int = 8) -> RecordDataset:
    records = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        if i in bad:
            path.write_bytes(b"\xff\xd8 truncated")
        else:
            write_image(path, i % len(PALETTE))
        records.append(Record(path.name, i % len(PALETTE)))
    classes = [f"c{k}" for k in range(len(PALETTE))]
    return RecordDataset(folder, records, classes, on_bad_image="skip")


def test_skips_are_totalled_across_dataloader_workers(tmp_path: Path) -> None:
    # batch_size=1 and two workers: worker 0 loads items 0, 2, 4..., worker 1 loads 1, 3, 5...
    ds = _dataset_with_bad_images(tmp_path, bad={2, 5})
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_first)
    labels = [int(y) for _, y in loader]
    del loader
    assert labels == [0, 1, 3, 3, 4, 6, 6, 7]  # each bad item replaced by the next good one
    assert ds._bad == set()  # nothing was read in this process...
    assert ds.skipped() == [str(tmp_path / "2.jpg"), str(tmp_path / "5.jpg")]  # ...yet both
    assert ds.num_skipped == 2
    log = ds._skip_log
    assert log is not None and len(list(log.glob("*.txt"))) == 2  # one small file per worker
    # Reading again in this process adds its own skips, each path still listed once.
    assert ds[2][1] == 3 and ds.skipped() == [str(tmp_path / "2.jpg"), str(tmp_path / "5.jpg")]
    del ds
    gc.collect()
    assert not log.exists()  # removed with the dataset


def test_pickled_copies_share_the_skip_log(tmp_path: Path) -> None:
    """Spawned workers get a pickled copy: its skips reach the original too."""
    ds = _dataset_with_bad_images(tmp_path, bad={4})
    copy = pickle.loads(pickle.dumps(ds))
    assert copy[4][1] == 5 and copy._bad == {4} and ds._bad == set()
    assert ds.skipped() == copy.skipped() == [str(tmp_path / "4.jpg")]
    del copy
    gc.collect()
    assert ds._skip_log is not None and ds._skip_log.is_dir()  # only the original removes it


def test_fail_policy_records_nothing_and_lists_nothing(tmp_path: Path) -> None:
    ds = _dataset_with_bad_images(tmp_path, bad=set())
    ds.on_bad_image = "fail"
    assert ds.skipped() == [] and ds._skip_log is not None
    good = RecordDataset(tmp_path, ds.records, ds.classes)
    assert good._skip_log is None and good.skipped() == [] and good.num_skipped == 0
    assert nearest_label(good[3][0].getpixel((1, 1)), len(PALETTE)) == 3


def _first(batch: list) -> tuple:
    return batch[0]


def test_exif_orientation_is_applied_after_the_box_crop(tmp_path: Path) -> None:
    write_sideways_jpeg(tmp_path / "phone.jpg")
    upright = np.asarray(open_rgb(tmp_path / "phone.jpg"), dtype=int)
    assert upright.shape == (32, 16, 3)  # turned: stored 32 wide x 16 high
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    assert np.abs(upright[:12] - red).max() < 40 and np.abs(upright[20:] - blue).max() < 40
    # The box is in the stored pixel grid (the red left half); the crop is then turned.
    records = [Record("phone.jpg", 0, (0, 0, 12, 16))]
    crop = np.asarray(RecordDataset(tmp_path, records, ["x"], box_crop=True)[0][0], dtype=int)
    assert crop.shape == (12, 16, 3) and np.abs(crop - red).max() < 40


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_and_elongated_images_are_bad_images(tmp_path: Path) -> None:
    side = int(MAX_PIXELS**0.5) + 1
    write_png_header(tmp_path / "bomb.png", side, side)  # refused from its header alone
    with pytest.raises(BadImageError, match=r"bomb\.png has .* pixels, above .*MAX_PIXELS"):
        open_rgb(tmp_path / "bomb.png")
    thin = (1, 40 * MAX_ASPECT_RATIO)
    Image.new("RGB", thin, (200, 30, 30)).save(tmp_path / "thin.png")
    write_image(tmp_path / "good.jpg", 1)
    records = [Record("thin.png", 0), Record("good.jpg", 1)]
    classes = ["a", "b"]
    recipe = {"recipe": "short_side", "size": 32}  # would make a 32 x 64,000 image of it
    ds = RecordDataset(tmp_path, records, classes, transform=recipe, on_bad_image="skip")
    image, label = ds[0]  # skipped and counted like an unreadable file
    assert tuple(image.shape) == (3, 32, 32) and label == 1
    assert ds.skipped() == [str(tmp_path / "thin.png")]
    with pytest.raises(BadImageError, match=rf"thin\.png is 1 x {thin[1]} pixels.*MAX_ASPECT"):
        RecordDataset(tmp_path, records, classes, transform=recipe)[0]


def test_a_worker_bad_image_error_is_the_same_one_line_message(tmp_path: Path) -> None:
    """A DataLoader worker's error reaches the main process rebuilt from its traceback."""
    ds = _dataset_with_bad_images(tmp_path, bad={3})
    ds.on_bad_image = "fail"
    with pytest.raises(BadImageError) as direct:
        ds[3]
    batches = iter(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_first))
    try:
        with pytest.raises(BadImageError) as from_worker:
            list(batches)
    finally:
        # Now: left to a later garbage collection, the shutdown runs in another test.
        batches._shutdown_workers()  # type: ignore[attr-defined]
    assert "Traceback" not in str(from_worker.value) and "\n" not in str(from_worker.value)
    assert str(from_worker.value) == str(direct.value)
    assert "3.jpg" in str(direct.value) and "dataset.on_bad_image=skip" in str(direct.value)
    assert is_user_error(from_worker.value) and message(from_worker.value) == str(direct.value)
