"""Any timm model as a backbone, through timm's own feature-extraction wrapper."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import timm
import torch

from bcnn.limits import Check, checked
from bcnn.models.backbones.base import (
    NETWORK_ERRORS,
    Backbone,
    WeightsFile,
    WeightsUnavailableError,
)
from bcnn.models.inputs import InputSpec


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return str(Path("~/.cache/huggingface/hub").expanduser())


def timm_name(value: Any) -> str | None:
    """A :class:`~bcnn.limits.Check`: a model timm knows, with close names when not."""
    if not isinstance(value, str) or timm.is_model(value):
        return None
    close = difflib.get_close_matches(value, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{value!r} is not a timm model{hint}; see timm.list_models()"


class TimmBackbone(Backbone):
    """A timm model's last (or chosen) feature map: (B, 3, H, W) -> (B, C, H/r, W/r).

    Built with ``timm.create_model(name, features_only=True, out_indices=(out_index,))``;
    C and the reduction r come from the model's ``feature_info``, the input convention
    (mean/std) from its ``pretrained_cfg``. Wide maps (ResNet-50: 2048 channels) want
    ``pooling.proj_dim`` before second-order pooling.

    Args:
        name: A timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet50.a1_in1k``).
        pretrained: Load the pretrained weights through timm (Hugging Face hub cache).
        weights: A local timm-format state dict or ``.safetensors`` file instead (e.g. the
            ``model.safetensors`` of the model's hub repository); head keys are ignored.
        out_index: Which feature level to return (timm ``out_indices``; -1 = last).
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``
            for transformers, ``drop_path_rate``).
    """

    @checked
    def __init__(
        self,
        name: Annotated[str, Check(timm_name)] = "resnet50",
        pretrained: bool = False,
        weights: WeightsFile | None = None,
        out_index: int = -1,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})

        def create(with_weights: bool) -> torch.nn.Module:
            return timm.create_model(
                name,
                pretrained=with_weights,
                features_only=True,
                out_indices=(out_index,),
                **kwargs,
            )

        try:
            self.model = create(pretrained)
        except NETWORK_ERRORS as err:
            if not pretrained:
                raise
            cfg = create(False).pretrained_cfg
            source = (
                f"https://huggingface.co/{cfg['hf_hub_id']}"
                if cfg.get("hf_hub_id")
                else cfg.get("url") or "(no URL in timm's pretrained_cfg)"
            )
            raise WeightsUnavailableError(
                f"Could not obtain timm's pretrained weights of {name!r} "
                f"({type(err).__name__}: {err}). Offline? On a machine with internet, fetch "
                f"{source} (e.g. `hf download {cfg.get('hf_hub_id', '')}`) into "
                f"the Hugging Face cache {_hf_cache_dir()} (HF_HOME moves it), or pass its "
                "model.safetensors as backbone.weights=<file> with backbone.pretrained=false."
            ) from err
        self.out_channels = int(self.model.feature_info.channels()[-1])
        self.reduction = int(self.model.feature_info.reduction()[-1])
        cfg = self.model.pretrained_cfg
        self.input_spec = InputSpec(
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        )
        self.load_weights_file(weights, module=self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H / reduction, W / reduction)."""
        return self.model(x)[-1]
