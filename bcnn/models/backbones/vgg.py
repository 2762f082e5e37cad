"""VGG backbones of the B-CNN papers: VGG-D (VGG-16, torchvision) and VGG-M (our module)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torchvision
from annotated_types import Interval
from torch import nn
from torchvision.models import vgg as tv_vgg

from bcnn.limits import Channels, Check, checked
from bcnn.models.backbones.base import (
    Backbone,
    WeightsFile,
    WeightsUnavailableError,
    torchvision_download,
)
from bcnn.models.inputs import IMAGENET, InputSpec

# relu5_3 is index 29 of torchvision's VGG-16 ``features``; index 30 is pool5, dropped so
# that a 448 input gives the 28x28 map of the papers.
_VGG16_RELU5_3 = 30

# MatConvNet's VGG-M expects RGB in [0, 255] minus the average image of its training set;
# the converter records the exact colour from the .mat, this is the usual ImageNet mean.
MATCONVNET_IMAGENET = InputSpec(mean=(123.68, 116.78, 103.94), std=(1.0, 1.0, 1.0), scale=255.0)


def _lrn(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return f"must be [N, kappa, alpha, beta], got {value}"
    n, kappa, alpha, beta = value
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"N (the first element) must be an integer >= 1, got {n}"
    if min(kappa, alpha, beta) < 0:
        return f"kappa, alpha and beta must be >= 0, got {value}"
    return None


# Local response normalization [N, kappa, alpha, beta] in MatConvNet's convention.
LRN = Annotated[Sequence[float], Check(_lrn)]
Dropout = Annotated[float, Interval(ge=0, lt=1)]


def _init_like_torchvision(module: nn.Module) -> None:
    """torchvision's VGG initialization (He normal, fan out; zero biases)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VGG16(Backbone):
    """VGG-D (VGG-16) up to relu5_3, pool5 dropped: (B, 3, 448, 448) -> (B, 512, 28, 28).

    torchvision's ``vgg16().features[:30]``, so its checkpoint file loads as it is.

    Args:
        pretrained: Load torchvision's ImageNet weights (``IMAGENET1K_V1``) through its
            download cache.
        weights: A local state dict or ``.safetensors`` file instead (torchvision's
            ``vgg16-397923af.pth``, a bcnn checkpoint, or a file converted from MatConvNet's
            ``imagenet-vgg-verydeep-16.mat``, whose input convention is then adopted).
    """

    @checked
    def __init__(self, pretrained: bool = False, weights: WeightsFile | None = None) -> None:
        super().__init__()
        # Only the convolutional part: building torchvision's whole vgg16() would also
        # initialize its 120M-parameter classifier (seconds on a CPU) to throw it away.
        features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)
        self.features = features[:_VGG16_RELU5_3]
        _init_like_torchvision(self.features)
        self.out_channels = 512
        self.input_spec = IMAGENET
        self._load(pretrained, weights)

    def _load(self, pretrained: bool, weights: str | None) -> None:
        """torchvision's ImageNet weights or a local file (a classifier reshaped to fc*)."""
        if pretrained:
            tv_weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
            with torchvision_download("VGG-16 (torchvision)", tv_weights):
                state = tv_weights.get_state_dict(progress=False)
            own = self.state_dict()
            self.load_state_dict({k: v for k, v in _classifier_as_conv(state).items() if k in own})
        self.load_weights_file(weights, remap=_classifier_as_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 512, H / 16, W / 16)."""
        return self.features(x)


class VGGM(Backbone):
    """VGG-M (Chatfield et al., BMVC 2014) up to relu5: (B, 3, 448, 448) -> (B, 512, 27, 27).

    Layer for layer (and named like) MatConvNet's ``imagenet-vgg-m.mat`` (its pool2 pad at
    the bottom/right is ``ceil_mode=True``); convert it with
    ``scripts/convert_matconvnet.py``.

    Args:
        pretrained: Must be False (raises with instructions otherwise).
        weights: A state dict or ``.safetensors`` file, e.g. converted from
            ``imagenet-vgg-m.mat``; its recorded input convention is adopted.
        lrn: LRN parameters in MatConvNet's convention ``[N, kappa, alpha, beta]``:
            y = x / (kappa + alpha * sum over N channels of x^2)^beta (alpha is *not*
            divided by N, unlike Caffe and ``torch.nn.LocalResponseNorm``).
    """

    @checked
    def __init__(
        self,
        pretrained: bool = False,
        weights: WeightsFile | None = None,
        lrn: LRN = (5, 2.0, 1e-4, 0.75),
    ) -> None:
        super().__init__()
        if pretrained:
            raise WeightsUnavailableError(
                "vgg_m: there are no torchvision/timm weights for VGG-M. Download "
                "imagenet-vgg-m.mat from https://www.vlfeat.org/matconvnet/pretrained/, "
                "convert it with `python scripts/convert_matconvnet.py imagenet-vgg-m.mat "
                "-o vgg_m.safetensors` and pass backbone.weights=vgg_m.safetensors "
                "(backbone.pretrained=false)."
            )
        self.lrn = list(lrn)
        n, kappa, alpha, beta = lrn
        n = int(n)

        def norm() -> nn.LocalResponseNorm:
            # torch divides alpha by the window size; MatConvNet does not.
            return nn.LocalResponseNorm(n, alpha=alpha * n, beta=beta, k=kappa)

        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 96, 7, stride=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", norm()),
                    ("pool1", nn.MaxPool2d(3, stride=2)),
                    ("conv2", nn.Conv2d(96, 256, 5, stride=2, padding=1)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", norm()),
                    ("pool2", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
                    ("conv3", nn.Conv2d(256, 512, 3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(512, 512, 3, padding=1)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(512, 512, 3, padding=1)),
                    ("relu5", nn.ReLU(inplace=True)),
                ]
            )
        )
        _init_like_torchvision(self.features)
        self.out_channels = 512
        self.input_spec = MATCONVNET_IMAGENET
        self.load_weights_file(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 512, H', W'); 448 -> 27, 224 -> 13."""
        return self.features(x)

    def divergence_hints(self) -> list[str]:
        """The LRN setting, which can make training diverge (kappa 0 divides by ~0)."""
        return [f"lrn={self.lrn}"]


def _fc_stack(pool5: nn.Module, window: int, dim: int, dropout: float) -> nn.Sequential:
    """pool5, then fc6 and fc7 as convolutions (+ ReLU, dropout): a 224 image gives (B, dim,
    1, 1), the fc7 activations; larger images a map of fc7 activations."""
    stack = nn.Sequential(
        OrderedDict(
            [
                ("pool5", pool5),
                ("fc6", nn.Conv2d(512, dim, window)),
                ("relu6", nn.ReLU(inplace=True)),
                ("drop6", nn.Dropout(dropout)),
                ("fc7", nn.Conv2d(dim, dim, 1)),
                ("relu7", nn.ReLU(inplace=True)),
            ]
        )
    )
    _init_like_torchvision(stack)
    return stack


def _classifier_as_conv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG-16 keys -> ``VGG16FC7`` keys: Linear fc6/fc7 reshaped to convolutions,
    fc8 (``classifier.6``) dropped. Files already in our layout pass unchanged."""
    out = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    for index, name in (("0", "fc6"), ("3", "fc7")):
        weight = state.get(f"classifier.{index}.weight")
        if weight is None:
            continue
        window = 7 if name == "fc6" else 1
        out[f"fc.{name}.weight"] = weight.reshape(weight.shape[0], -1, window, window)
        out[f"fc.{name}.bias"] = state[f"classifier.{index}.bias"]
    return out


class VGG16FC7(VGG16):
    """VGG-D through fc7 + ReLU, the FC-CNN [D] features of ICCV 2015: 224 -> (B, 4096, 1, 1).

    fc6 and fc7 are torchvision's ``classifier.0`` / ``classifier.3`` as 7x7 and 1x1
    convolutions after pool5 (larger images give a map, which ``pooling=avg`` averages).

    Args:
        pretrained: Load torchvision's ImageNet weights through its download cache.
        weights: A local file: torchvision's ``vgg16-397923af.pth`` (its classifier is
            reshaped), a bcnn checkpoint, or a MatConvNet conversion with fc layers.
        dropout: Dropout after fc6 while training (fine-tuning), 0.5 as in VGG.
        fc_dim: Width of fc6 and fc7 (4096; smaller only for tests).
    """

    @checked
    def __init__(
        self,
        pretrained: bool = False,
        weights: WeightsFile | None = None,
        dropout: Dropout = 0.5,
        fc_dim: Channels = 4096,
    ) -> None:
        super().__init__()
        self.fc = _fc_stack(nn.MaxPool2d(2, 2), 7, int(fc_dim), dropout)
        self.out_channels = int(fc_dim)
        self._load(pretrained, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 4096, H / 32 - 6, W / 32 - 6); 224 -> 1 x 1."""
        return self.fc(self.features(x))


class VGGMFC7(VGGM):
    """VGG-M through fc7 + ReLU, the FC-CNN [M] features of ICCV 2015: 224 -> (B, 4096, 1, 1).

    ``VGGM``'s layers, then MatConvNet's pool5 (3x3, stride 2, pad [0 1 0 1]), fc6 (6x6) and
    fc7 (1x1), keys ``fc.*`` of the converted file (which ``VGGM`` ignores).

    Args:
        pretrained: Must be False (see ``VGGM``).
        weights: A converted ``imagenet-vgg-m.mat`` with its fc layers.
        lrn: LRN parameters, as ``VGGM``.
        dropout: Dropout after fc6 while training.
        fc_dim: Width of fc6 and fc7 (4096; smaller only for tests).
    """

    @checked
    def __init__(
        self,
        pretrained: bool = False,
        weights: WeightsFile | None = None,
        lrn: LRN = (5, 2.0, 1e-4, 0.75),
        dropout: Dropout = 0.5,
        fc_dim: Channels = 4096,
    ) -> None:
        super().__init__(pretrained=pretrained, weights=None, lrn=lrn)
        self.fc = _fc_stack(nn.MaxPool2d(3, stride=2, ceil_mode=True), 6, int(fc_dim), dropout)
        self.out_channels = int(fc_dim)
        self.load_weights_file(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, fc_dim, h, w); 224 -> 1 x 1."""
        return self.fc(self.features(x))
