"""Intermediate feature maps of a backbone, by layer name, without editing the backbone.

Texture synthesis matches Gram matrices at several depths (VGG-D: relu1_1 to relu5_1),
but a bcnn backbone returns only its last map. torchvision's ``create_feature_extractor``
(an FX trace) reaches any node of any traceable backbone, timm's ``features_only``
wrappers included; this module adds the layer names of the papers on top of the node
names (``relu1_1`` for VGG-D, ``relu1`` ... ``relu5`` for VGG-M, ``relu1`` ... for the small
CNN, ``level0`` ... for timm's feature levels) and a default set per backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from bcnn.models.backbones import VGG16, VGGM, SmallCNN, TimmBackbone
from bcnn.models.inputs import InputNormalizer, InputSpec

# The texture layers of Gatys et al. and Lin & Maji (CVPR 2016) for VGG-D.
VGG16_TEXTURE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def layer_aliases(backbone: nn.Module) -> dict[str, str]:
    """Readable layer names of ``backbone`` -> FX node names (empty for other backbones).

    Args:
        backbone: A bcnn backbone.

    Returns:
        VGG-D: ``conv1_1``/``relu1_1``/``pool1`` ...; VGG-M and the small CNN:
        ``relu1`` ...; timm: ``level0`` ... (its feature levels up to the one it returns).
    """
    if isinstance(backbone, (VGGM, SmallCNN)):
        relus = [n for n, m in backbone.features.named_children() if isinstance(m, nn.ReLU)]
        return {f"relu{i + 1}": f"features.{name}" for i, name in enumerate(relus)}
    if isinstance(backbone, VGG16):
        aliases, block, conv = {}, 1, 0
        for name, m in backbone.features.named_children():
            if isinstance(m, nn.Conv2d):
                conv += 1
                aliases[f"conv{block}_{conv}"] = f"features.{name}"
            elif isinstance(m, nn.ReLU):
                aliases[f"relu{block}_{conv}"] = f"features.{name}"
            else:  # max pooling, or average pooling in FeatureTaps(avg_pool=True)
                aliases[f"pool{block}"], block, conv = f"features.{name}", block + 1, 0
        return aliases
    if isinstance(backbone, TimmBackbone):
        info = backbone.model.feature_info
        # FeatureListNet flattens module paths: "features.3" becomes the child "features_3".
        return {
            f"level{i}": "model." + info.info[i]["module"].replace(".", "_")
            for i in range(max(info.out_indices) + 1)
        }
    return {}


def default_layers(backbone: nn.Module) -> list[str]:
    """The layers whose Gram matrices texture synthesis matches by default.

    Raises:
        ValueError: the backbone has no default (name the layers with ``texture.layers``).
    """
    if isinstance(backbone, VGG16):
        return list(VGG16_TEXTURE_LAYERS)
    aliases = layer_aliases(backbone)
    if aliases:
        return list(aliases)
    raise ValueError(
        f"viz.texture.layers: {type(backbone).__name__} has no default texture layers; name "
        f"them, e.g. viz.texture.layers=[<node>, ...] with nodes from: "
        f"{', '.join(node_names(backbone)[:40])} ..."
    )


def node_names(backbone: nn.Module) -> list[str]:
    """The FX node names of ``backbone`` in eval mode (what ``layers`` may name)."""
    return get_graph_node_names(backbone)[1]


class FeatureTaps(nn.Module):
    """Images in [0, 1] -> the feature maps of chosen layers of a backbone.

    The backbone is copied (its in-place ReLUs made out-of-place so that a tapped map is
    not overwritten by the next layer), frozen and put in eval mode; the caller's module is
    left as it was.

    Args:
        backbone: A bcnn backbone (any FX-traceable module).
        layers: Layer names: aliases of ``layer_aliases`` or FX node names; ``None`` for
            ``default_layers``.
        input_spec: The pixel convention of the backbone (default: its ``input_spec``).
        avg_pool: Replace its max-pooling modules by average pooling of the same window, as
            Gatys et al. do for synthesis: gradients reach every pixel of a window, not one.

    Raises:
        ValueError: an unknown layer name, listing the valid ones.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[str] | None = None,
        input_spec: InputSpec | None = None,
        avg_pool: bool = False,
    ) -> None:
        super().__init__()
        backbone = copy.deepcopy(backbone).eval()
        for module in backbone.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
            for name, child in module.named_children():
                if avg_pool and isinstance(child, nn.MaxPool2d):
                    k, s, p, c = child.kernel_size, child.stride, child.padding, child.ceil_mode
                    setattr(module, name, nn.AvgPool2d(k, s, p, c, count_include_pad=False))
        backbone.requires_grad_(False)
        self.layers = list(layers) if layers is not None else default_layers(backbone)
        if not self.layers:
            raise ValueError("viz.texture.layers: name at least one layer")
        aliases = layer_aliases(backbone)
        nodes = set(node_names(backbone))
        unknown = [n for n in self.layers if n not in aliases and n not in nodes]
        if unknown:
            raise ValueError(
                f"viz.texture.layers: unknown layer(s) {unknown} for "
                f"{type(backbone).__name__}; use one of {sorted(aliases) or ''} or an FX "
                f"node name such as {sorted(nodes)[:12]} ..."
            )
        return_nodes = {aliases.get(n, n): n for n in self.layers}
        self.extractor = create_feature_extractor(backbone, return_nodes=return_nodes).eval()
        if input_spec is None:
            input_spec = getattr(backbone, "input_spec", None) or InputSpec()
        self.input_norm = InputNormalizer(input_spec)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) floats in [0, 1] -> {layer: (B, C_l, H_l, W_l)}."""
        out = self.extractor(self.input_norm(images))
        return {name: out[name] for name in self.layers}
