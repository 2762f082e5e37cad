"""Backbones: feature-map shapes at 448, weight files, offline errors, two-stream alignment."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import save_file

import bcnn.config  # noqa: F401  (registers the train_schema the root config extends)
from bcnn.models import build_model
from bcnn.models.backbones import (
    VGG16,
    VGGM,
    DenseNet201,
    InputAdapter,
    TimmBackbone,
    WeightsUnavailableError,
    align_maps,
)
from bcnn.models.backbones.densenet import _rename_legacy_keys
from bcnn.models.backbones.vgg import MATCONVNET_IMAGENET
from bcnn.models.inputs import IMAGENET, InputSpec


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(VGG16, (1, 512, 28, 28)), (VGGM, (1, 512, 27, 27)), (DenseNet201, (1, 1920, 14, 14))],
)
def test_feature_map_shapes_at_448(cls, shape):
    backbone = cls().eval()
    with torch.inference_mode():
        out = backbone(torch.randn(1, 3, 448, 448))
    assert out.shape == shape
    assert backbone.out_channels == shape[1]
    assert (out >= 0).all()  # every backbone ends with a ReLU


def test_two_stream_alignment_drops_one_row_and_column():
    a = torch.arange(28.0).view(1, 1, 28, 1).expand(1, 2, 28, 28)
    b = torch.zeros(1, 3, 27, 27)
    a2, b2 = align_maps(a, b)
    assert a2.shape == (1, 2, 27, 27) and b2.shape == (1, 3, 27, 27)
    # The authors' round(linspace(1, 28, 27)) drops the 14th row (1-based) only.
    kept = a2[0, 0, :, 0].tolist()
    assert kept == [float(i) for i in range(28) if i != 13]
    b_big, a_small = align_maps(torch.zeros(1, 1, 5, 9), torch.zeros(1, 1, 7, 4))
    assert b_big.shape[2:] == a_small.shape[2:] == (5, 4)


def test_two_stream_input_conversion_and_output():
    cfg = None
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("train", overrides=["backbone=vgg_dm"])
    model = build_model(cfg, 2)
    assert model.input_spec == IMAGENET  # the data follows stream_a (torchvision VGG-D)
    fa, fb = model.backbone(torch.randn(1, 3, 64, 64))
    assert fa.shape == (1, 512, 3, 3) and fb.shape == (1, 512, 3, 3)


@pytest.mark.parametrize("dst_color", ["RGB", "BGR"])
def test_input_adapter_is_exact(dst_color):
    pixels = torch.rand(2, 3, 5, 5)  # RGB in [0, 1]
    src = IMAGENET
    dst = InputSpec(mean=(103.9, 116.8, 123.7), std=(1.0, 2.0, 1.0), color=dst_color, scale=255.0)

    def encode(spec: InputSpec) -> torch.Tensor:
        v = pixels if spec.color == "RGB" else pixels.flip(1)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        return (v * spec.scale - mean) / std

    torch.testing.assert_close(
        InputAdapter(src, dst)(encode(src)), encode(dst), rtol=1e-5, atol=1e-4
    )


def test_weights_state_dict_and_safetensors(tmp_path):
    source = VGGM()
    state = source.state_dict()
    pt = tmp_path / "vggm.pt"
    torch.save(state, pt)
    st = tmp_path / "vggm.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    for path in (pt, st):
        with initialize_config_module("bcnn.configs", version_base="1.3"):
            cfg = compose("train", overrides=["backbone=vgg_m", f"backbone.weights={path}"])
        loaded = build_model(cfg, 2).backbone
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, state[key])
        # A plain state dict carries no input convention: the module's default stays.
        assert loaded.input_spec == MATCONVNET_IMAGENET


def test_weights_accepts_original_and_bcnn_checkpoints(tmp_path):
    vggm = VGGM()
    # The original network's extra parts (a classifier) are ignored ...
    full = {**vggm.state_dict(), "classifier.weight": torch.zeros(10, 4)}
    torch.save(full, tmp_path / "full.pth")
    VGGM(weights=str(tmp_path / "full.pth"))
    # ... and the backbone part of a bcnn model checkpoint is picked.
    ckpt = {f"backbone.{k}": v for k, v in vggm.state_dict().items()}
    ckpt["classifier.weight"] = torch.zeros(3, 3)
    # Training checkpoints also hold optimizer and RNG states (numpy arrays).
    rng = {"numpy": np.random.default_rng(0).bit_generator.state, "legacy": np.random.get_state()}
    torch.save({"model": ckpt, "epoch": 3, "rng": rng}, tmp_path / "ckpt.pt")
    loaded = VGGM(weights=str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(loaded.features.conv1.weight, vggm.features.conv1.weight)
    assert loaded.input_spec == MATCONVNET_IMAGENET  # no convention recorded: the default
    # A checkpoint's recorded input convention (a converted network's mean) is adopted.
    spec = {"mean": [120.0, 110.0, 100.0], "std": [1.0, 1.0, 1.0], "color": "RGB", "scale": 255.0}
    torch.save({"model": ckpt, "input_spec": spec}, tmp_path / "ckpt_spec.pt")
    adopted = VGGM(weights=str(tmp_path / "ckpt_spec.pt")).input_spec
    assert adopted.mean == (120.0, 110.0, 100.0) and adopted.scale == 255.0


def test_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        VGGM(weights=str(missing))
    state = VGGM().state_dict()
    del state["features.conv5.bias"]
    state["features.conv6.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(RuntimeError, match=r"bad\.pt.*missing keys: features\.conv5\.bias"):
        VGGM(weights=str(bad))
    with pytest.raises(RuntimeError, match=r"unexpected keys: features\.conv6\.weight"):
        VGGM(weights=str(bad))
    with pytest.raises(ValueError, match="not both"):
        VGG16(pretrained=True, weights=str(bad))


def test_densenet_legacy_key_names():
    renamed = _rename_legacy_keys(
        {"features.denseblock1.denselayer1.norm.1.weight": torch.zeros(1), "classifier.bias": 0}
    )
    assert set(renamed) == {"features.denseblock1.denselayer1.norm1.weight", "classifier.bias"}


def test_pretrained_offline_error_torchvision(tmp_path, monkeypatch):
    """No cached file and no network: one error with the URL and the cache path."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        DenseNet201(pretrained=True)
    message = str(info.value)
    assert "https://download.pytorch.org/models/densenet201-c1103571.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "densenet201-c1103571.pth") in message
    assert "backbone.weights=" in message


def test_pretrained_offline_error_timm(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(WeightsUnavailableError, match=r"huggingface\.co/timm/resnet18"):
        TimmBackbone("resnet18", pretrained=True)


def test_vgg_m_pretrained_explains_the_conversion():
    with pytest.raises(WeightsUnavailableError, match=r"convert_matconvnet\.py"):
        VGGM(pretrained=True)


def test_timm_backbone_declares_channels_and_spec(tmp_path):
    backbone = TimmBackbone("resnet18", out_index=-2)
    assert backbone.out_channels == 256 and backbone.reduction == 16
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    assert backbone.input_spec.mean == pytest.approx((0.485, 0.456, 0.406))
    # Its own state dict (keys "model.*") loads back through weights=.
    torch.save(backbone.state_dict(), tmp_path / "r18.pt")
    again = TimmBackbone("resnet18", out_index=-2, weights=str(tmp_path / "r18.pt"))
    torch.testing.assert_close(again.model.conv1.weight, backbone.model.conv1.weight)


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        # ViT/DeiT patch 16: 2x2 and 14x14 tokens; EVA-02 patch 14 pads 32 to 42: 3x3.
        ("vit_tiny_patch16_224", {32: 2, 224: 14}),
        ("eva02_tiny_patch14_224", {32: 3, 224: 16}),
    ],
)
def test_token_backbones_take_any_input_size(name, sizes):
    backbone = TimmBackbone(name).eval()
    assert backbone.reduction in (14, 16)
    with torch.no_grad():
        for size, grid in sizes.items():
            # The patch tokens only: no class token among the locations.
            assert backbone(torch.randn(1, 3, size, size)).shape == (1, 192, grid, grid)


def test_prefix_tokens_join_the_patch_tokens_on_request():
    x = torch.randn(2, 3, 64, 64)
    patches = TimmBackbone("vit_tiny_patch16_224").eval()
    torch.manual_seed(0)
    both = TimmBackbone("vit_tiny_patch16_224", prefix_tokens=True).eval()
    both.load_state_dict(patches.state_dict())
    with torch.no_grad():
        grid, tokens = patches(x), both(x)
    assert grid.shape == (2, 192, 4, 4) and tokens.shape == (2, 192, 1, 1 + 16)
    torch.testing.assert_close(tokens[:, :, 0, 1:], grid.flatten(2))  # class token first
    with pytest.raises(ValueError, match=r"backbone\.prefix_tokens=true: .* no class"):
        TimmBackbone("convnext_atto", prefix_tokens=True)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_timm_weights_files_of_the_original_model_load(name, tmp_path):
    import timm

    # The file a user downloads holds the whole model (head included) under timm's names,
    # which timm's feature wrappers rename ("stages.0" -> "stages_0", a ViT under "model.").
    dynamic = {"dynamic_img_size": True} if name.startswith("vit") else {}
    original = timm.create_model(name, **dynamic).eval()
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "m.st")
    (tmp_path / "m.st").rename(tmp_path / "model.safetensors")
    backbone = TimmBackbone(name, weights=str(tmp_path / "model.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        if name.startswith("vit"):
            expected = original.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        else:
            expected = original.forward_features(x)
        torch.testing.assert_close(backbone(x), expected)


def test_a_feature_level_timm_does_not_have_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"'backbone\.out_index': 10 but timm's 'resnet18' has 5"):
        TimmBackbone("resnet18", out_index=10)
