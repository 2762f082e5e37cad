"""FV-CNN "ft" cells read the conv layers of a fine-tuned FC-CNN checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from bcnn.models.backbones import VGG16, VGG16FC7, VGGM, VGGMFC7


def test_fc7_checkpoints_load_into_the_conv_backbones(tmp_path: Path) -> None:
    # The trainer's checkpoint holds the whole model under "model" (backbone.*, pooling.*,
    # classifier.*); vgg_d / vgg_m keep the conv part of the fc7 backbones and ignore fc.*.
    torch.manual_seed(0)
    for fc7_cls, conv_cls in ((VGG16FC7, VGG16), (VGGMFC7, VGGM)):
        fc7 = fc7_cls(fc_dim=8)
        state = {f"backbone.{k}": v for k, v in fc7.state_dict().items()}
        state["classifier.weight"] = torch.zeros(3, 8)
        path = tmp_path / f"{fc7_cls.__name__}.pt"
        torch.save({"model": state}, path)
        conv = conv_cls(weights=str(path))
        own = conv.state_dict()
        assert own and all(torch.equal(own[k], fc7.state_dict()[k]) for k in own)
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():  # the same conv features: the FV encodes what FC-CNN learned
            torch.testing.assert_close(conv(x), fc7.features(x))
