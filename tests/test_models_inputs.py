"""The model owns its input convention and its frozen backbone."""

from __future__ import annotations

import torch

from bcnn.models import build_model
from bcnn.models.inputs import IMAGENET, InputNormalizer, InputSpec
from tests.conftest import compose_config


def _image() -> torch.Tensor:
    # One 2x2 image, every pixel (200, 100, 50).
    return torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)


def test_uint8_and_unit_float_inputs_normalize_to_the_spec() -> None:
    norm = InputNormalizer(IMAGENET)
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), IMAGENET.mean, IMAGENET.std)]
    from_uint8 = norm(_image())
    from_float = norm(_image().float() / 255)
    assert from_uint8.dtype == torch.float32 and from_uint8.shape == (1, 3, 2, 2)
    assert torch.allclose(from_uint8[0, :, 0, 0], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(from_uint8, from_float, atol=1e-6)


def test_matconvnet_convention_swaps_channels_and_scales() -> None:
    # BGR order, values in 0..255, mean given in BGR order.
    caffe = InputSpec(mean=(10.0, 20.0, 30.0), std=(1.0, 1.0, 2.0), color="BGR", scale=255.0)
    out = InputNormalizer(caffe)(_image())
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([40.0, 80.0, 85.0]), atol=1e-3)


def test_constants_are_buffers_outside_the_state_dict() -> None:
    model = build_model(compose_config(), 3)
    assert isinstance(model.input_norm.pixel_mean, torch.Tensor)
    names = {name for name, _ in model.named_buffers()}
    assert {"input_norm.pixel_mean", "input_norm.pixel_std"} <= names
    assert not any(key.startswith("input_norm.") for key in model.state_dict())
    model.to(torch.float64)  # buffers follow the module
    assert model.input_norm.pixel_std.dtype == torch.float64


def test_model_gives_the_same_logits_for_uint8_and_unit_float_images() -> None:
    torch.manual_seed(0)
    model = build_model(compose_config(), 4).eval()
    model.classifier.weight.data.normal_()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(images), model(images.float() / 255), atol=1e-5)


def test_frozen_backbone_stays_in_eval_mode_and_gets_no_gradient() -> None:
    model = build_model(compose_config(["backbone.batch_norm=true"]), 3)
    model.freeze_backbone()
    model.train()
    assert model.training and model.classifier.training and not model.backbone.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)).sum().backward()
    assert torch.equal(bn.running_mean, before)  # frozen statistics
    model.freeze_backbone(False)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
