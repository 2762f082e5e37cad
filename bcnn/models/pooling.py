"""Pooling heads: feature map(s) (B, C, H, W) -> (B, d, d) matrix or (B, D) vector.

Every head takes ``in_channels`` from ``build_model`` (the backbone's ``out_channels``: an
int, or a pair for two-stream backbones) and an optional 1x1 projection of each stream
(``proj_dim``). The heads, their outputs and their two-stream forms: docs/models.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from annotated_types import Gt, Interval, Le
from torch import nn

from bcnn.limits import Channels, NonNegative, PositiveInt, Seed, checked
from bcnn.models.shapes import FeatureShape
from bcnn.ops import GMM, RandomMaclaurin, TensorSketch, democratic_pool, fisher_vector, fit_gmm

Features = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def locations(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C) with n = H W, the layout of ``bcnn.ops``."""
    return x.flatten(2).transpose(1, 2)


def _as_list(x: Features) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _projection(in_channels: int, out_channels: int, bn: bool, relu: bool) -> nn.Sequential:
    """1x1 convolution without bias (+ BatchNorm, + ReLU): (B, C, H, W) -> (B, k, H, W)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(out_channels))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PoolingHead(nn.Module):
    """Base of the pooling heads; ``two_streams_ok``: it takes a two-stream backbone's pair.

    Args:
        in_channels: Channels of the backbone's map, or a pair for two streams.
        proj_dim: Output channels of an optional 1x1 projection of each stream (None: no
            projection).
        proj_bn: BatchNorm after the projection.
        proj_relu: ReLU after the projection (and BatchNorm).
        proj_lr_scale: Learning rate of the projection relative to the head's learning
            rate (its own optimizer group, see ``BilinearModel.param_groups``).
        proj_init: ``random`` (the convolution's default), or ``pca``: fitted before
            training (``fit``) as low-rank bilinear pooling does (Kong & Fowlkes'
            ``main001_PCAinitP4caffe.m``; docs/models.md).
        fit_images: Training images the fit reads (evenly spaced; None: all of them).
    """

    two_streams_ok: ClassVar[bool] = False
    # Why the head never fine-tunes (the trainer then refuses a finetune stage), or None.
    linear_stage_only: ClassVar[str | None] = None
    proj_fitted: torch.Tensor

    @checked
    def __init__(
        self,
        in_channels: int | Sequence[int],
        proj_dim: Channels | None = None,
        proj_bn: bool = False,
        proj_relu: bool = False,
        proj_lr_scale: NonNegative = 1.0,
        proj_init: Literal["random", "pca"] = "random",
        fit_images: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        self.proj_init, self.fit_images = proj_init, fit_images
        # Persistent: a checkpoint says whether the projection was fitted.
        self.register_buffer("proj_fitted", torch.tensor(proj_init != "pca"))
        streams = tuple(
            map(int, in_channels if isinstance(in_channels, Sequence) else [in_channels])
        )
        if len(streams) not in (1, 2):
            raise ValueError(f"pooling: expected 1 or 2 streams, got in_channels={in_channels}")
        if len(streams) == 2 and not self.two_streams_ok:
            raise ValueError(
                f"{type(self).__name__} does not combine two feature maps (two-stream "
                "backbone such as vgg_dm); use pooling=sum, compact or avg"
            )
        if proj_init == "pca" and proj_dim and proj_dim > min(streams):
            raise ValueError(
                f"pooling.proj_init=pca gives at most as many directions as the backbone "
                f"has channels ({min(streams)}), got pooling.proj_dim={proj_dim}: lower "
                "pooling.proj_dim or use pooling.proj_init=random"
            )
        self.proj: nn.ModuleList | None = None
        if proj_dim:
            self.proj = nn.ModuleList(
                _projection(c, int(proj_dim), proj_bn, proj_relu) for c in streams
            )
            streams = (int(proj_dim),) * len(streams)
        self.channels = streams
        self.proj_lr_scale = float(proj_lr_scale)

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """A PCA-initialized projection needs its size."""
        if values.get("proj_init") == "pca" and not values.get("proj_dim"):
            return "proj_init", "pca initializes the projection: set pooling.proj_dim"
        return None

    @property
    def output_shape(self) -> FeatureShape:
        """Per-sample shape of the output: symmetric (d, d) matrices, (d_a, d_b) for a
        two-stream x_a x_b^T, or (D,) vectors."""
        raise NotImplementedError

    def streams(self, x: Features) -> list[torch.Tensor]:
        """The input map(s) as a list, projected when the head has a projection."""
        xs = _as_list(x)
        if len(xs) != len(self.channels):
            raise ValueError(
                f"{type(self).__name__} was built for {len(self.channels)} feature map(s) "
                f"but got {len(xs)}"
            )
        if self.proj is not None:
            xs = [p(t) for p, t in zip(self.proj, xs, strict=True)]
        return xs

    @property
    def needs_fit(self) -> bool:
        """True while a part of the head learned from data (the PCA projection) is unset."""
        return not bool(self.proj_fitted)

    @torch.no_grad()
    def fit(self, maps: Iterable[Features]) -> dict[str, Any]:
        """Fits the projection by PCA of the local features of backbone maps.

        Args:
            maps: Backbone outputs (B, C, H, W) of training images (``fit_images`` of them).

        Returns:
            ``{"images": ..., "explained": share of the second moment kept}``.
        """
        assert self.proj is not None
        grams: list[torch.Tensor] = [0] * len(self.channels)  # type: ignore[list-item]
        images = 0
        for fmap in maps:
            xs = _as_list(fmap)
            for i, x in enumerate(xs):
                feats = locations(x).double()  # (B, n, C)
                # Each image's x x^T summed over locations, divided by n^2 as the authors do.
                grams[i] = grams[i] + (feats.mT @ feats).sum(0) / feats.shape[1] ** 2
            images += xs[0].shape[0]
        explained = []
        convs = [m for m in self.proj.modules() if isinstance(m, nn.Conv2d)]  # one a stream
        for gram, conv in zip(grams, convs, strict=True):
            values, vectors = torch.linalg.eigh(gram)  # ascending
            k = conv.out_channels
            top, basis = values.flip(0)[:k].clamp_min(1e-12), vectors.flip(1)[:, :k]
            weight = (basis * top.rsqrt()).T  # (k, C): s^-1/2 u^T per output channel
            conv.weight.copy_(weight.view_as(conv.weight).to(conv.weight.dtype))
            explained.append(float(values.flip(0)[:k].sum() / values.sum().clamp_min(1e-30)))
        self.proj_fitted.fill_(True)
        return {"images": images, "explained": explained}

    def projection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the 1x1 projection (empty without one)."""
        return [] if self.proj is None else list(self.proj.parameters())


class AvgPool(PoolingHead):
    """First-order baseline: the mean feature over locations, (B, C, H, W) -> (B, C); two
    streams give the concatenation of both means, (B, C_a + C_b)."""

    two_streams_ok = True

    @property
    def output_shape(self) -> FeatureShape:
        return FeatureShape((sum(self.channels),))

    def forward(self, x: Features) -> torch.Tensor:
        """(B, C, H, W) or a pair -> (B, out_dim)."""
        return torch.cat([t.mean(dim=(2, 3)) for t in self.streams(x)], dim=1)


def bilinear(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """(1/n) sum_x a_x b_x^T over the n = H W locations, in float32 (float64 stays).

    Args:
        a: (B, C_a, H, W).
        b: (B, C_b, H, W), or None for a itself.

    Returns:
        (B, C_a, C_b). Accumulated in float32 even under autocast: the result feeds matrix
        functions, and the sum of n squared activations overflows float16.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        fa = a.flatten(2)
        if fa.dtype not in (torch.float32, torch.float64):
            fa = fa.float()
        if b is None:
            fb = fa
        else:
            if b.shape[2:] != a.shape[2:]:
                raise ValueError(
                    f"bilinear pooling of two streams needs equal spatial sizes, got "
                    f"{tuple(a.shape[2:])} and {tuple(b.shape[2:])}"
                )
            fb = b.flatten(2).to(fa.dtype)
        return fa @ fb.transpose(1, 2) / fa.shape[-1]


class BilinearPool(PoolingHead):
    """Sum (bilinear) pooling: A = (1/n) sum_x x x^T over the n = H W locations; two streams
    give the x_a x_b^T (B, C_a, C_b) of B-CNN [D, M]. Float32 (float64 stays)."""

    two_streams_ok = True

    @property
    def output_shape(self) -> FeatureShape:
        c = self.channels
        return FeatureShape((c[0], c[-1]), symmetric=len(c) == 1)

    def forward(self, x: Features) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, C); a pair -> (B, C_a, C_b)."""
        return bilinear(*self.streams(x))


class DemocraticHead(PoolingHead):
    """Base of the gamma-democratic heads (``bcnn.ops.democratic_pool``), one stream.

    Args:
        in_channels: C.
        gamma: 1 = sum (average) pooling, 0 = fully democratic.
        tau: Damping of the Sinkhorn updates.
        iters: Sinkhorn iterations (10 in the paper).
        detach: No gradient through the weights (the authors' code).
        **proj: Projection options of ``PoolingHead``.
    """

    order: ClassVar[int]

    @checked
    def __init__(
        self,
        in_channels: int | Sequence[int],
        gamma: Annotated[float, Interval(ge=0, le=1)] = 0.5,
        tau: Annotated[float, Gt(0), Le(1)] = 0.5,
        iters: Annotated[int, Interval(ge=1, le=1000)] = 10,
        detach: bool = False,
        **proj: Any,
    ) -> None:
        super().__init__(in_channels, **proj)
        self.gamma, self.tau, self.iters, self.detach = float(gamma), float(tau), int(iters), detach

    @property
    def output_shape(self) -> FeatureShape:
        return FeatureShape((self.channels[0],) * self.order, symmetric=self.order == 2)

    def forward(self, x: Features) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, C) (second order) or (B, C) (first order), float32."""
        (t,) = self.streams(x)
        return democratic_pool(
            locations(t),
            gamma=self.gamma,
            tau=self.tau,
            iters=self.iters,
            detach=self.detach,
            order=self.order,
        )

    def divergence_hints(self) -> list[str]:
        """The Sinkhorn settings, which can make training diverge (``key=value``)."""
        return [f"tau={self.tau}", f"gamma={self.gamma}", f"iters={self.iters}"]

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, tau={self.tau}, iters={self.iters}, detach={self.detach}"


class DemocraticPool(DemocraticHead):
    """gamma-democratic aggregation (Lin et al., ECCV 2018): A = sum_x alpha_x x x^T /
    sum alpha, weights equalizing each location's share of the second-order kernel; gamma = 1
    is ``sum`` (CUB/Cars 0.5, Aircraft 0.0). Arguments: those of ``DemocraticHead``."""

    order = 2


class DemocraticAvgPool(DemocraticHead):
    """First-order gamma-democratic aggregation (Murray et al., 2016; ECCV 2018 Tables 2-5):
    sum_x alpha_x x / sum alpha, (B, C, H, W) -> (B, C); gamma = 1 is ``avg``. Arguments:
    those of ``DemocraticHead``."""

    order = 1


class CompactPool(PoolingHead):
    """Compact bilinear pooling (Gao et al., CVPR 2016): (B, C, H, W) -> (B, D), a random
    feature map whose inner products approximate those of (1/n) sum_x x x^T (or x_a x_b^T).

    Args:
        in_channels: C, or (C_a, C_b) for two streams.
        sketch: ``sketch(in_dim, in_dim2=...)`` -> a module (B, n, C) (and (B, n, C_b)) ->
            (B, D) with an ``out_dim``: a ``_partial_`` of ``bcnn.ops.TensorSketch`` or
            ``bcnn.ops.RandomMaclaurin`` (its random projections are saved buffers).
        **proj: Projection options of ``PoolingHead``.
    """

    two_streams_ok = True
    passes: ClassVar[dict] = {"sketch": ("in_dim", "in_dim2")}  # given to the sketch

    def __init__(
        self,
        in_channels: int | Sequence[int],
        sketch: Callable[..., TensorSketch | RandomMaclaurin],
        **proj: Any,
    ) -> None:
        super().__init__(in_channels, **proj)
        c2 = self.channels[1] if len(self.channels) == 2 else None
        self.sketch = sketch(self.channels[0], in_dim2=c2)

    @property
    def output_shape(self) -> FeatureShape:
        return FeatureShape((self.sketch.out_dim,))

    def forward(self, x: Features) -> torch.Tensor:
        """(B, C, H, W) or a pair -> (B, D), float32."""
        return self.sketch(*(locations(t) for t in self.streams(x)))


class FisherPool(PoolingHead):
    """Improved Fisher vector of the local features (FV-CNN): (B, C, H, W) -> (B, 2 K C).

    The FV [D] / FV [M] baseline of ICCV 2015 (``bcnn.ops.fisher_vector``; the chain's
    signed square root and L2 make it "improved"). The K-component GMM is fitted once by EM
    on a seeded sample of frozen backbone features before training (``fit``); its
    parameters are buffers, so checkpoints and the feature-cache key carry them.

    Args:
        in_channels: C (one stream).
        num_components: K (64 in the papers).
        num_samples: Local features sampled for EM (about 1000 per component).
        samples_per_image: At most this many random locations per image.
        em_iters: Maximum EM iterations.
        seed: Seed of the sample and of the k-means++ initialization.
        **proj: Projection options of ``PoolingHead``.
    """

    fitted: torch.Tensor
    linear_stage_only = (
        "the Fisher vector's GMM is fitted once on frozen features and FV-CNN never "
        "fine-tunes through it"
    )

    @checked
    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_components: Annotated[int, Interval(ge=1, le=65536)] = 64,
        num_samples: PositiveInt = 64_000,
        samples_per_image: PositiveInt = 200,
        em_iters: Annotated[int, Interval(ge=1, le=100_000)] = 100,
        seed: Seed = 0,
        **proj: Any,
    ) -> None:
        super().__init__(in_channels, **proj)
        if self.fit_images is None:  # as many images as the sample needs
            self.fit_images = -(-num_samples // samples_per_image)
        self.gmm = GMM(num_components, self.channels[0])
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.num_samples, self.samples_per_image = num_samples, samples_per_image
        self.em_iters, self.seed = em_iters, seed

    @property
    def output_shape(self) -> FeatureShape:
        return FeatureShape((2 * self.gmm.means.numel(),))

    @staticmethod
    def config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """EM needs a sample at least as large as the mixture; PCA init is not offered."""
        if values["num_samples"] < values["num_components"]:
            return (
                "num_samples",
                f"must be at least pooling.num_components={values['num_components']}, got "
                f"{values['num_samples']}",
            )
        if values.get("proj_init") == "pca":
            return "proj_init", "pooling=fisher does not support pca; use random"
        return None

    @property
    def needs_fit(self) -> bool:
        """True until the GMM has been fitted (or loaded from a checkpoint)."""
        return not bool(self.fitted)

    @torch.no_grad()
    def fit(self, maps: Iterable[Features]) -> dict[str, Any]:
        """Fits the GMM on local features sampled from backbone maps.

        Args:
            maps: Backbone outputs (B, C, H, W) of training images, in a fixed order;
                consumed until ``num_samples`` features are drawn.

        Returns:
            EM's information (iterations, log-likelihood history, ...).
        """
        gen = torch.Generator().manual_seed(self.seed)
        chunks, total = [], 0
        for fmap in maps:
            (x,) = self.streams(fmap)
            feats = locations(x).float().cpu()  # (B, n, C)
            n = feats.shape[1]
            k = min(self.samples_per_image, n)
            for image in feats:
                take = torch.randperm(n, generator=gen)[:k]
                chunks.append(image[take])
                total += k
            if total >= self.num_samples:
                break
        if total < self.gmm.means.shape[0]:
            raise ValueError(
                f"pooling=fisher: only {total} local features to fit {self.gmm.means.shape[0]} "
                "GMM components; use more training images or fewer pooling.num_components"
            )
        samples = torch.cat(chunks)[: self.num_samples]
        gmm, info = fit_gmm(
            samples, self.gmm.means.shape[0], max_iters=self.em_iters, seed=self.seed
        )
        self.gmm.load_state_dict({k: v.to(self.fitted.device) for k, v in gmm.state_dict().items()})
        self.fitted.fill_(True)
        info["samples"] = len(samples)
        return info

    def forward(self, x: Features) -> torch.Tensor:
        """(B, C, H, W) -> (B, 2 K C), float32."""
        if self.needs_fit:
            raise RuntimeError(
                "pooling=fisher: the GMM has not been fitted; the trainer fits it before the "
                "first stage (FisherPool.fit on backbone maps of training images)"
            )
        (t,) = self.streams(x)
        return fisher_vector(locations(t), self.gmm)

    def extra_repr(self) -> str:
        return f"num_components={self.gmm.means.shape[0]}, fitted={not self.needs_fit}"
