"""MatConvNet conversion: fixture .mat files in the three layouts, checked against an
independent numpy implementation of MatConvNet's layers that reads the .mat arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from numpy.lib.stride_tricks import sliding_window_view

from bcnn.models.backbones import VGG16, VGG16FC7, VGGM, VGGMFC7
from tests.conftest import load_script

script = load_script("convert_matconvnet")
convert_matconvnet, read_matconvnet = script.convert_matconvnet, script.read_matconvnet
save_weights = script.save_weights

LRN = [5.0, 2.0, 1e-4, 0.75]
# (name, kh, kw, cin, cout, stride, pad) of VGG-M up to conv5, as in imagenet-vgg-m.mat.
VGGM_CONVS = [
    ("conv1", 7, 7, 3, 96, 2, 0),
    ("conv2", 5, 5, 96, 256, 2, 1),
    ("conv3", 3, 3, 256, 512, 1, 1),
    ("conv4", 3, 3, 512, 512, 1, 1),
    ("conv5", 3, 3, 512, 512, 1, 1),
]
VGG16_WIDTHS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
AVERAGE_COLOUR = (122.7717, 115.9465, 102.9801)


def _cell(items: list) -> np.ndarray:
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def _filters(rng: np.random.Generator, kh: int, kw: int, cin: int, cout: int) -> np.ndarray:
    return (rng.standard_normal((kh, kw, cin, cout)) * math.sqrt(2.0 / (kh * kw * cin))).astype(
        np.float32
    )


def _vggm_layers(rng: np.random.Generator, legacy: bool, fc_dim: int | None = None) -> list[dict]:
    """simplenn layer structs of VGG-M, plus a (shrunk) classifier that is not converted.

    With ``fc_dim``, also fc6 (6x6) and fc7 (1x1) of that width, with ReLU and dropout, as
    the real file has (width 4096 there).
    """
    layers: list[dict] = []
    pools = {
        "conv1": ("pool1", 0.0),
        "conv2": ("pool2", np.array([[0.0, 1.0, 0.0, 1.0]])),
        "conv5": ("pool5", np.array([[0.0, 1.0, 0.0, 1.0]])),
    }
    for name, kh, kw, cin, cout, stride, pad in VGGM_CONVS:
        w = _filters(rng, kh, kw, cin, cout)
        b = (rng.standard_normal((1, cout)) * 0.1).astype(np.float32)
        conv = {"name": name, "type": "conv", "stride": float(stride), "pad": float(pad)}
        if legacy:
            conv.update(filters=w, biases=b)
        else:
            conv["weights"] = _cell([w, b])
        layers.append(conv)
        idx = name[-1]
        layers.append({"name": f"relu{idx}", "type": "relu"})
        if name in ("conv1", "conv2"):
            lrn_type = "normalize" if legacy else "lrn"
            layers.append({"name": f"norm{idx}", "type": lrn_type, "param": np.array([LRN])})
        if name in pools:
            pname, ppad = pools[name]
            layers.append(
                {
                    "name": pname,
                    "type": "pool",
                    "method": "max",
                    "pool": np.array([[3.0, 3.0]]),
                    "stride": 2.0,
                    "pad": ppad,
                }
            )
    width = 512
    if fc_dim is not None:
        for name, k, cin in (("fc6", 6, 512), ("fc7", 1, fc_dim)):
            w = _filters(rng, k, k, cin, fc_dim)
            b = (rng.standard_normal((1, fc_dim)) * 0.1).astype(np.float32)
            layer = {"name": name, "type": "conv", "stride": 1.0, "pad": 0.0}
            layer.update({"filters": w, "biases": b} if legacy else {"weights": _cell([w, b])})
            idx = name[-1]
            layers += [layer, {"name": f"relu{idx}", "type": "relu"}]
            layers.append({"name": f"dropout{idx}", "type": "dropout", "rate": 0.5})
        width = fc_dim
    fc = {"name": "fc8", "type": "conv", "stride": 1.0, "pad": 0.0}
    w, b = _filters(rng, 1, 1, width, 10), np.zeros((1, 10), np.float32)
    fc.update({"filters": w, "biases": b} if legacy else {"weights": _cell([w, b])})
    layers += [fc, {"name": "prob", "type": "softmax"}]
    return layers


def write_vggm(path: Path, layout: str, seed: int = 0, fc_dim: int | None = None) -> Path:
    """A .mat with VGG-M's structure and real layer shapes, random weights."""
    rng = np.random.default_rng(seed)
    if layout in ("simplenn", "simplenn-legacy"):
        legacy = layout == "simplenn-legacy"
        layers = _vggm_layers(rng, legacy, fc_dim)
        if legacy:
            # Old files: a full H x W x 3 average image at the top level.
            avg = np.broadcast_to(np.array(AVERAGE_COLOUR, np.float32), (8, 8, 3)).copy()
            avg += rng.standard_normal((8, 8, 3)).astype(np.float32)
            avg -= avg.mean(axis=(0, 1)) - np.array(AVERAGE_COLOUR, np.float32)
            top = {"layers": _cell(layers), "normalization": {"averageImage": avg}}
        else:
            avg = np.array(AVERAGE_COLOUR, np.float32).reshape(1, 1, 3)
            top = {
                "layers": _cell(layers),
                "meta": {"normalization": {"averageImage": avg, "imageSize": [224.0, 224, 3]}},
            }
    elif layout == "dagnn":
        simple = _vggm_layers(rng, legacy=False)
        dag = np.zeros(
            (1, len(simple)),
            dtype=[("name", "O"), ("type", "O"), ("params", "O"), ("block", "O")],
        )
        params = []
        for i, layer in enumerate(simple):
            kind = layer["type"]
            block: dict = {}
            names: list = []
            if kind == "conv":
                w, b = layer["weights"][0]
                names = [f"{layer['name']}f", f"{layer['name']}b"]
                params += [{"name": names[0], "value": w}, {"name": names[1], "value": b.T}]
                block = {
                    "size": np.array([w.shape], dtype=float),
                    "hasBias": True,
                    "stride": np.array([[layer["stride"]] * 2]),
                    "pad": np.array([[layer["pad"]] * 4]),
                }
                dtype = "dagnn.Conv"
            elif kind == "relu":
                dtype = "dagnn.ReLU"
            elif kind == "lrn":
                dtype, block = "dagnn.LRN", {"param": layer["param"]}
            elif kind == "pool":
                dtype = "dagnn.Pooling"
                block = {
                    "method": "max",
                    "poolSize": layer["pool"],
                    "stride": layer["stride"],
                    "pad": layer["pad"],
                }
            else:
                dtype = "dagnn.SoftMax"
            dag[0, i] = (layer["name"], dtype, _cell(names), block)
        pstruct = np.zeros((1, len(params)), dtype=[("name", "O"), ("value", "O")])
        for i, p in enumerate(params):
            pstruct[0, i] = (p["name"], p["value"])
        avg = np.array(AVERAGE_COLOUR, np.float32).reshape(1, 1, 3)
        top = {"layers": dag, "params": pstruct, "meta": {"normalization": {"averageImage": avg}}}
    else:
        raise ValueError(layout)
    scipy.io.savemat(str(path), top, do_compression=False)
    return path


def write_vgg16(path: Path, seed: int = 0) -> Path:
    """imagenet-vgg-verydeep-16.mat's structure (simplenn, top-level normalization)."""
    rng = np.random.default_rng(seed)
    layers, cin = [], 3
    for block, (width, reps) in enumerate(VGG16_WIDTHS, start=1):
        for r in range(1, reps + 1):
            w = _filters(rng, 3, 3, cin, width)
            b = (rng.standard_normal((1, width)) * 0.1).astype(np.float32)
            layers.append(
                {
                    "name": f"conv{block}_{r}",
                    "type": "conv",
                    "weights": _cell([w, b]),
                    "stride": np.array([[1.0, 1.0]]),
                    "pad": np.array([[1.0, 1.0, 1.0, 1.0]]),
                }
            )
            layers.append({"name": f"relu{block}_{r}", "type": "relu"})
            cin = width
        layers.append(
            {
                "name": f"pool{block}",
                "type": "pool",
                "method": "max",
                "pool": np.array([[2.0, 2.0]]),
                "stride": np.array([[2.0, 2.0]]),
                "pad": np.array([[0.0, 0.0, 0.0, 0.0]]),
            }
        )
    avg = np.array([123.68, 116.779, 103.939], np.float32).reshape(1, 1, 3)
    top = {"layers": _cell(layers), "normalization": {"averageImage": avg}}
    scipy.io.savemat(str(path), top, do_compression=False)
    return path


# ------------------------------------------------ reference: MatConvNet layers in numpy


def _pad4(v) -> tuple[int, int, int, int]:
    v = np.asarray(v, dtype=float).ravel()
    v = np.repeat(v, 4) if v.size == 1 else v
    return tuple(int(e) for e in v)  # type: ignore[return-value]


def ref_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad) -> np.ndarray:
    """vl_nnconv: x (H, W, C), w (kh, kw, C, K) -> (H', W', K), cross-correlation."""
    t, bo, left, r = _pad4(pad)
    kh, kw, c, k = w.shape
    x = np.pad(x, ((t, bo), (left, r), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]  # (H', W', C, kh, kw)
    h, wd = win.shape[:2]
    cols = win.transpose(0, 1, 3, 4, 2).reshape(h * wd, kh * kw * c)
    return (cols @ w.reshape(kh * kw * c, k)).reshape(h, wd, k) + b.ravel()


def ref_lrn(x: np.ndarray, param) -> np.ndarray:
    """vl_nnnormalize: y_k = x_k (kappa + alpha sum_{q in G(k)} x_q^2)^-beta."""
    n, kappa, alpha, beta = (float(v) for v in np.asarray(param).ravel())
    c = x.shape[2]
    sq = x**2
    out = np.empty_like(x)
    for k in range(c):
        lo = max(0, k - math.floor((n - 1) / 2))
        hi = min(c, k + math.ceil((n - 1) / 2) + 1)
        out[:, :, k] = x[:, :, k] * (kappa + alpha * sq[:, :, lo:hi].sum(-1)) ** -beta
    return out


def ref_maxpool(x: np.ndarray, pool, stride, pad) -> np.ndarray:
    """vl_nnpool max: padding never wins."""
    t, bo, left, r = _pad4(pad)
    ph, pw = (int(v) for v in np.asarray(pool).ravel())
    s = int(np.asarray(stride).ravel()[0])
    x = np.pad(x, ((t, bo), (left, r), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(x, (ph, pw), axis=(0, 1))[::s, ::s].max(axis=(-1, -2))


def reference_forward(mat_path: Path, x: np.ndarray, last: str) -> np.ndarray:
    """Runs the simplenn layers of ``mat_path`` on x (H, W, 3) up to layer ``last``."""
    m = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)
    for layer in np.atleast_1d(m["layers"]):
        kind = layer.type
        if kind == "conv":
            w, b = layer.weights
            w = np.asarray(w, np.float64)
            w = w.reshape(1, 1, *w.shape) if w.ndim == 2 else w  # loadmat squeezes 1x1 filters
            x = ref_conv(
                x,
                w,
                np.asarray(b, np.float64),
                int(np.ravel(layer.stride)[0]),
                layer.pad,
            )
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "lrn":
            x = ref_lrn(x, layer.param)
        elif kind == "pool":
            x = ref_maxpool(x, layer.pool, layer.stride, layer.pad)
        if layer.name == last:
            return x
    raise AssertionError(f"no layer {last}")


def _compare(ours: torch.Tensor, ref: np.ndarray) -> None:
    got = ours.detach().double().numpy()[0].transpose(1, 2, 0)
    assert got.shape == ref.shape
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * scale)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def vggm_mats(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mat")
    return {
        layout: write_vggm(root / f"vggm_{layout}.mat", layout)
        for layout in ("simplenn", "simplenn-legacy", "dagnn")
    }


@pytest.mark.parametrize("layout", ["simplenn", "simplenn-legacy", "dagnn"])
def test_read_layouts_agree(vggm_mats, layout):
    net = read_matconvnet(vggm_mats[layout])
    assert net.layout == layout
    reference = read_matconvnet(vggm_mats["simplenn"])
    convs = [layer for layer in net.layers if layer.kind == "conv"]
    ref_convs = [layer for layer in reference.layers if layer.kind == "conv"]
    assert [c.weight.shape for c in convs] == [c.weight.shape for c in ref_convs]
    np.testing.assert_allclose(net.average_colour, AVERAGE_COLOUR, rtol=1e-5)


@pytest.mark.parametrize("layout", ["simplenn", "simplenn-legacy", "dagnn"])
def test_vggm_conversion_reproduces_matconvnet_forward(vggm_mats, layout):
    state, meta = convert_matconvnet(vggm_mats[layout], arch="auto")
    assert meta["arch"] == "vgg_m" and meta["layout"] == layout
    model = VGGM()
    model.load_state_dict(state, strict=True)
    # 75 x 91 (non-square, so that an H/W swap shows) gives a 4 x 5 relu5 map and feeds
    # pool2 an odd-sized map, where its asymmetric [0 1 0 1] padding matters.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((75, 91, 3)) * 60.0  # mean-subtracted 0-255 pixels
    with torch.no_grad():
        ours = model(torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None])
    ref = reference_forward(vggm_mats["simplenn"], x, last="relu5")
    assert ours.shape == (1, 512, 4, 5)
    _compare(ours, ref)
    # The recorded input convention is MatConvNet's: RGB, 0-255, minus the mean colour.
    spec = meta["input_spec"]
    assert spec["scale"] == 255.0 and spec["std"] == [1.0, 1.0, 1.0] and spec["color"] == "RGB"
    np.testing.assert_allclose(spec["mean"], AVERAGE_COLOUR, rtol=1e-5)


def test_vgg16_conversion_reproduces_matconvnet_forward(tmp_path):
    mat = write_vgg16(tmp_path / "imagenet-vgg-verydeep-16.mat")
    state, meta = convert_matconvnet(mat)
    assert meta["arch"] == "vgg_d"
    model = VGG16()
    model.load_state_dict(state, strict=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 48, 3)) * 60.0
    with torch.no_grad():
        ours = model(torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None])
    assert ours.shape == (1, 512, 2, 3)
    _compare(ours, reference_forward(mat, x, last="relu5_3"))
    np.testing.assert_allclose(meta["input_spec"]["mean"], [123.68, 116.779, 103.939], rtol=1e-5)


def test_convert_script_and_backbone_weights(vggm_mats, tmp_path):
    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"vgg_m{suffix}"
        assert script.main([str(vggm_mats["simplenn"]), "-o", str(out)]) == 0
        backbone = VGGM(weights=str(out))
        assert backbone.input_spec.scale == 255.0
        np.testing.assert_allclose(backbone.input_spec.mean, AVERAGE_COLOUR, rtol=1e-5)
        state, _ = convert_matconvnet(vggm_mats["simplenn"])
        for key, value in backbone.state_dict().items():
            torch.testing.assert_close(value, state[key])


def test_lrn_mismatch_is_reported(vggm_mats):
    with pytest.raises(ValueError, match=r"backbone\.lrn="):
        convert_matconvnet(vggm_mats["simplenn"], lrn=(5, 1.0, 1e-4, 0.75))


def test_hdf5_mat_is_reported(tmp_path):
    path = tmp_path / "v73.mat"
    path.write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + b"\0" * 600)
    with pytest.raises(ValueError, match=r"v7\.3"):
        read_matconvnet(path)


def test_save_weights_round_trip(tmp_path, vggm_mats):
    state, meta = convert_matconvnet(vggm_mats["dagnn"])
    for suffix in (".safetensors", ".pt"):
        path = save_weights(state, meta, tmp_path / f"w{suffix}")
        model = VGGM(weights=str(path))
        assert model.input_spec.scale == 255.0


def test_vggm_fc7_conversion_reproduces_matconvnet_forward(tmp_path):
    mat = write_vggm(tmp_path / "vggm_fc.mat", "simplenn", fc_dim=8)
    state, meta = convert_matconvnet(mat)
    model = VGGMFC7(fc_dim=8).eval()
    model.load_state_dict(state, strict=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((224, 224, 3)) * 60.0
    with torch.no_grad():
        ours = model(torch.from_numpy(x.transpose(2, 0, 1).copy()).float()[None])
    assert ours.shape == (1, 8, 1, 1)  # fc7 at 224 x 224
    _compare(ours, reference_forward(mat, x, last="relu7"))
    # The same file still loads into the convolutional backbone (fc keys ignored).
    out = save_weights(state, meta, tmp_path / "vgg_m.safetensors")
    conv_only = VGGM(weights=str(out))
    torch.testing.assert_close(conv_only.features.conv5.weight, model.features.conv5.weight)


def test_vgg16_fc7_reads_torchvision_linear_classifier(tmp_path):
    torch.manual_seed(0)
    ours = VGG16FC7(fc_dim=16, dropout=0.0).eval()
    fc6, fc7 = torch.nn.Linear(512 * 7 * 7, 16), torch.nn.Linear(16, 16)
    state = {f"features.{k}": v for k, v in ours.features.state_dict().items()}
    state.update({"classifier.0.weight": fc6.weight.data, "classifier.0.bias": fc6.bias.data})
    state.update({"classifier.3.weight": fc7.weight.data, "classifier.3.bias": fc7.bias.data})
    state["classifier.6.weight"] = torch.randn(10, 16)  # fc8: dropped
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = VGG16FC7(weights=str(tmp_path / "vgg16.pth"), fc_dim=16).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pool5 = loaded.fc.pool5(loaded.features(x))
        expected = fc7(fc6(pool5.flatten(1)).relu()).relu()  # torchvision's classifier
        got = loaded(x)
    assert got.shape == (1, 16, 1, 1)
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-4, atol=1e-5)
