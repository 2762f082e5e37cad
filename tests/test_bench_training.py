"""scripts/bench_training.py: its figures are consistent with each other and with what ran."""

from __future__ import annotations

import math
from pathlib import Path

import benchlib as bench
import pytest

from tests.conftest import load_script

IMAGES, BATCH = 10, 4


def _load_script():
    return load_script("bench_training")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench_training")
    script = _load_script()
    argv = [
        "--device", "cpu", "--models", "small_bcnn", "--size", "32", "--batch", str(BATCH),
        "--steps", "2", "--warmup", "1", "--precision", "32", "--cache-model", "small_bcnn",
        "--cache-images", str(IMAGES), "--cache-size", "32", "--out", str(out),
    ]  # fmt: skip
    assert script.main(argv) == 0
    return out


def test_throughput_columns_follow_from_the_step_times(results: Path) -> None:
    meta, rows = bench.read_csv(results / "training_cpu.csv")
    assert meta["command"].startswith("python scripts/bench_training.py --device cpu")
    assert {"device", "date"} <= set(meta)
    (row,) = rows
    assert row["model"] == "small_bcnn" and int(row["batch"]) == BATCH
    step, infer, backbone = (float(row[k]) for k in ("step_ms", "infer_ms", "backbone_step_ms"))
    assert step > 0 and infer > 0 and backbone > 0
    assert float(row["train_img_s"]) == pytest.approx(BATCH * 1000 / step, rel=1e-9)
    assert float(row["infer_img_s"]) == pytest.approx(BATCH * 1000 / infer, rel=1e-9)
    share = 100 * max(0.0, 1 - backbone / step)
    assert float(row["head_share_pct"]) == pytest.approx(share, rel=1e-9, abs=1e-12)
    # FLOPs are counted on every device; MFU needs a known GPU peak.
    assert 0 < float(row["gflop_per_img"]) < 1
    assert math.isnan(float(row["peak_tflops"])) and math.isnan(float(row["mfu_pct"]))


def test_cached_stage_reuses_the_extraction(results: Path) -> None:
    _, (cache,) = bench.read_csv(results / "training_cpu_cache.csv")
    extract, epochs = float(cache["extract_pass_s"]), float(cache["cached_25_epochs_s"])
    assert extract > 0 and epochs > 0
    assert float(cache["cached_stage_over_one_pass"]) == pytest.approx((extract + epochs) / extract)
    # The backbone ran once per batch of the extraction, never in the 25 epochs, and not
    # again when the same cache was asked for a second time.
    assert int(cache["extract_backbone_calls"]) == math.ceil(IMAGES / BATCH)
    assert int(cache["epoch_backbone_calls"]) == 0
    assert int(cache["reuse_backbone_calls"]) == 0
    assert int(cache["epoch_images"]) == 25 * IMAGES


def test_report_and_readme_section_quote_the_files(results: Path) -> None:
    md = (results / "training_cpu.md").read_text()
    assert "- command: `python scripts/bench_training.py" in md and "- date: " in md
    _, (cache,) = bench.read_csv(results / "training_cpu_cache.csv")
    ratio = f"{float(cache['cached_stage_over_one_pass']):.2f}x one pass"
    section = (results / "README.md").read_text()
    assert "## Training throughput" in section and ratio in section
    assert "GPU targets, **not yet measured**" in section  # no training_cuda.csv here
