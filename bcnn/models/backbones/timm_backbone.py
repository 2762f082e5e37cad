"""Any timm model as a backbone, through timm's own feature-extraction wrapper."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Any

import timm
import torch
from huggingface_hub.constants import HF_HUB_CACHE

from bcnn.errors import ConfigError
from bcnn.limits import Check, checked
from bcnn.models.backbones.base import (
    NETWORK_ERRORS,
    Backbone,
    WeightsFile,
    WeightsUnavailableError,
)
from bcnn.models.inputs import IMAGENET, InputSpec

# Token models (ViT, DeiT, EVA, DINOv2; Swin without the padding) take any input size with
# these; other models refuse them (a TypeError) and are built without.
TOKEN_KWARGS = ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True})


def timm_name(value: Any) -> str | None:
    """A :class:`~bcnn.limits.Check`: a model timm knows, with close names when not."""
    if not isinstance(value, str) or timm.is_model(value):
        return None
    close = difflib.get_close_matches(value, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{value!r} is not a timm model{hint}; see timm.list_models()"


class TimmBackbone(Backbone):
    """A timm model's last (or chosen) feature map: (B, 3, H, W) -> (B, C, H/r, W/r).

    timm's ``features_only`` wrapper; C and the reduction r from its ``feature_info``, the
    input convention from its ``pretrained_cfg``. Token models take any input size (timm's
    ``dynamic_img_size``); their patch tokens are the locations.

    Args:
        name: A timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet50.a1_in1k``).
        pretrained: Load the pretrained weights through timm (Hugging Face hub cache).
        weights: A local timm-format state dict or ``.safetensors`` file instead (e.g. the
            ``model.safetensors`` of the model's hub repository); head keys are ignored.
        out_index: Which feature level to return (timm ``out_indices``; -1 = last).
        prefix_tokens: Also use a token model's class and register tokens as locations:
            the map is then (B, C, 1, P + H/r W/r), prefix tokens first.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (e.g.
            ``drop_path_rate``; ``dynamic_img_size: false`` and ``img_size`` fix the size).
    """

    @checked
    def __init__(
        self,
        name: Annotated[str, Check(timm_name)] = "resnet50",
        pretrained: bool = False,
        weights: WeightsFile | None = None,
        out_index: int = -1,
        prefix_tokens: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()

        # timm's features_only wrapper; its feature_info and pretrained_cfg are untyped.
        def create(with_weights: bool) -> Any:
            options: dict[str, Any] = {"pretrained": with_weights, "features_only": True}
            options["out_indices"] = (out_index,)
            for extra in TOKEN_KWARGS:
                try:
                    return timm.create_model(name, **options, **extra | dict(model_kwargs or {}))
                except TypeError as err:
                    if "dynamic_img" not in str(err):
                        raise
            return timm.create_model(name, **options, **(model_kwargs or {}))

        try:
            self.model = create(pretrained)
        except IndexError:  # timm's message names no key
            every: Any = timm.create_model(name, features_only=True)
            levels = len(every.feature_info)
            raise ConfigError(
                "backbone.out_index",
                f"{out_index} but timm's {name!r} has {levels} feature levels: use 0 to "
                f"{levels - 1}, or -1 for the last",
            ) from None
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
                f"the Hugging Face cache {HF_HUB_CACHE} (HF_HOME moves it), or pass its "
                "model.safetensors as backbone.weights=<file> with backbone.pretrained=false."
            ) from err
        # A token model's network: timm's FeatureGetterNet wraps it as ``model``.
        if prefix_tokens and not getattr(
            getattr(self.model, "model", None), "num_prefix_tokens", 0
        ):
            raise ValueError(
                f"backbone.prefix_tokens=true: timm's {name!r} has no class or register "
                "tokens; use backbone.prefix_tokens=false"
            )
        self.prefix_tokens = prefix_tokens
        self.out_channels = int(self.model.feature_info.channels()[-1])
        self.reduction = int(self.model.feature_info.reduction()[-1])
        cfg = self.model.pretrained_cfg
        m, s = cfg.get("mean", IMAGENET.mean), cfg.get("std", IMAGENET.std)
        self.input_spec = InputSpec(
            mean=(float(m[0]), float(m[1]), float(m[2])),
            std=(float(s[0]), float(s[1]), float(s[2])),
        )
        self.load_weights_file(weights, module=self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H / r, W / r), or (B, C, 1, P + H W / r^2) with the
        P prefix tokens."""
        if not self.prefix_tokens:
            return self.model(x)[-1]
        getter = self.model
        ((patches, prefix),) = getter.model.forward_intermediates(
            x,
            indices=getter.out_indices,
            return_prefix_tokens=True,
            norm=getter.norm,
            intermediates_only=True,
        )
        return torch.cat([prefix.transpose(1, 2), patches.flatten(2)], dim=2).unsqueeze(2)
