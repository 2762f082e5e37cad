r"""Where a second-order descriptor looks: per-location contributions (the identities are
derived in docs/visualize.md, ``kind=maps``).

A head pools the n local features x of an image into xi = sum_x w(x) x x^T, with weights
that sum to 1 (sum pooling: 1/n; gamma-democratic: the Sinkhorn weights alpha, normalized).
The contribution of a feature is C(x) = x^T xi x, so sum_x w(x) C(x) = ||xi||_F^2; after a
matrix function f, C_f(x) = x^T f(A) x and sum_x C_f(x) / n = <A, f(A)>. The class map
S_c(x) splits the logit s_c exactly, sum_x S_c(x) = s_c - b_c - rho_c (b_c: the bias; rho_c:
the share of a matrix step's ridge), by a proportional (LRP z-rule) pass back through the
classifier, the elementwise steps and the matrix steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bcnn.models.model import BilinearModel
from bcnn.models.normalization import MatrixStep, add_ridge
from bcnn.models.pooling import BilinearPool, DemocraticPool, locations
from bcnn.ops import democratic_weights, powm


@dataclass
class LocalFeatures:
    """The features a pooling head reads: X (B, n, d), n = h w locations in row-major order
    (float32), and the grid (h, w)."""

    X: torch.Tensor
    grid: tuple[int, int]


@torch.no_grad()
def local_features(model: BilinearModel, images: torch.Tensor) -> LocalFeatures:
    """The (projected) feature map of a one-stream ``model`` at each location.

    Args:
        model: A one-stream model.
        images: (B, 3, H, W), uint8 or floats in [0, 1].

    Raises:
        ValueError: a two-stream backbone (phi(x) = x_a x_b^T is not covered here).
    """
    streams = model.pooling.streams(model.backbone(model.normalize_input(images)))
    if len(streams) != 1:
        raise ValueError(
            "contribution maps need a one-stream backbone (phi(x) = x x^T); this model pools "
            "two streams (x_a x_b^T)"
        )
    (t,) = streams
    return LocalFeatures(locations(t).float(), (int(t.shape[2]), int(t.shape[3])))


def contributions(X: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """C(x) = x^T xi x: X (B, n, d) and a descriptor xi (B, d, d) -> (B, n)."""
    return torch.einsum("bnd,bde,bne->bn", X, xi.to(X.dtype), X)


def pooled(X: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """xi = sum_x w(x) x x^T: X (B, n, d) and weights (B, n) -> (B, d, d)."""
    return torch.einsum("bn,bnd,bne->bde", weights.to(X.dtype), X, X)


@dataclass
class Contributions:
    """Per-location contributions to one descriptor: ``values`` C(x) (B, n), the pooling
    ``weights`` w(x) (B, n, summing to 1), the ``descriptor`` xi or f(A) (B, d, d) and, for
    democratic pooling, the raw Sinkhorn weights ``alpha`` (B, n)."""

    values: torch.Tensor
    weights: torch.Tensor
    descriptor: torch.Tensor
    alpha: torch.Tensor | None = None

    def shares(self) -> torch.Tensor:
        """(B, n) w(x) C(x) / sum_y w(y) C(y): each location's share of the total."""
        wc = self.weights * self.values
        return wc / wc.sum(1, keepdim=True).clamp_min(torch.finfo(wc.dtype).tiny)


def _uniform(X: torch.Tensor) -> torch.Tensor:
    return torch.full(X.shape[:2], 1.0 / X.shape[1], dtype=X.dtype, device=X.device)


def sum_contributions(X: torch.Tensor) -> Contributions:
    """Sum pooling of X (B, n, d): w(x) = 1/n, xi = A."""
    w = _uniform(X)
    xi = pooled(X, w)
    return Contributions(contributions(X, xi), w, xi)


def democratic_contributions(
    X: torch.Tensor, gamma: float = 0.5, tau: float = 0.5, iters: int = 10
) -> Contributions:
    """gamma-democratic pooling of X (B, n, d): w = alpha / sum alpha, with ``gamma``,
    ``tau`` and ``iters`` of ``bcnn.ops.democratic_weights``."""
    alpha = democratic_weights(X, gamma=gamma, tau=tau, iters=iters).to(X.dtype)
    w = alpha / alpha.sum(1, keepdim=True)
    xi = pooled(X, w)
    return Contributions(contributions(X, xi), w, xi, alpha)


def matrix_contributions(
    X: torch.Tensor, function: nn.Module | None = None, p: float = 0.5, eps: float = 1e-4
) -> Contributions:
    """Matrix-normalized sum pooling of X (B, n, d): C_f(x) = x^T f(A) x.

    Args:
        X: (B, n, d).
        function: f, (B, d, d) -> (B, d, d) (e.g. a model's matrix steps); ``None``:
            (A + eps tr(A)/d I)^p by eigendecomposition.
        p: The power when ``function`` is None.
        eps: The relative ridge when ``function`` is None.
    """
    w = _uniform(X)
    A = pooled(X, w)
    if function is None:
        fA = powm(add_ridge(A.double(), eps, "trace"), p).to(X.dtype)
    else:
        fA = function(A).to(X.dtype)
    return Contributions(contributions(X, fA), w, fA)


def pooling_weights(model: BilinearModel, X: torch.Tensor) -> torch.Tensor:
    """The weights w(x) (B, n) with which ``model``'s head pools X (B, n, d).

    Raises:
        ValueError: a head that is not a sum of weighted outer products.
    """
    head = model.pooling
    if isinstance(head, DemocraticPool):
        alpha = democratic_weights(X, gamma=head.gamma, tau=head.tau, iters=head.iters)
        return (alpha / alpha.sum(1, keepdim=True)).to(X.dtype)
    if isinstance(head, BilinearPool):
        return _uniform(X)
    raise ValueError(
        f"class-specific maps need a matrix pooling head (pooling=sum, democratic or "
        f"spectral); this model pools with {type(head).__name__}"
    )


def steps(model: BilinearModel, phase: str) -> nn.Sequential:
    """The steps of one phase (``matrix``, ``vectorize``, ``elementwise``) of ``model``'s
    normalization chain, as one module (maybe empty)."""
    return nn.Sequential(*(s for s in model.normalization.steps.values() if s.phase == phase))


@dataclass
class ClassContributions:
    """Class c's score split over locations: ``values`` S_c(x) (B, n); per image the class
    ``target``, its logit ``score``, the classifier's ``bias`` b_c and the ridge's share
    ``ridge`` rho_c (each (B,)); ``logits`` (B, classes); the map's ``grid`` (h, w)."""

    values: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor
    bias: torch.Tensor
    ridge: torch.Tensor
    logits: torch.Tensor
    grid: tuple[int, int]


def _relevance_on_matrix(
    model: BilinearModel, M: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c's relevance R_U (B, d, d) on U = f(M), with <R_U, U> = s_c - b_c.

    The classifier's relevance r = z ds_c/dz on the normalized descriptor z (exact for a
    classifier linear in z) goes in full to the entries v of the vectorized U that the
    elementwise steps scale (z_k = h_k v_k): R = r / v per unit of v (0 where v = 0), carried
    back through the linear vectorization.

    Returns:
        ``(U, R_U, logits, target, score)``; ``target``: the predicted classes when None.
    """
    mat, vec, elem = (steps(model, p) for p in ("matrix", "vectorize", "elementwise"))
    with torch.enable_grad():
        U = mat(M).detach().requires_grad_(True)
        V = vec(U)
        Vd = V.detach().requires_grad_(True)
        Z = elem(Vd)
        logits = model.classifier(Z)
        target = (logits.argmax(1) if target is None else target).to(logits.device)
        score = logits.gather(1, target[:, None])[:, 0]
        (gZ,) = torch.autograd.grad(score.sum(), Z, retain_graph=True)
        r, v = (gZ * Z).detach(), Vd.detach()
        R_v = torch.where(v == 0, torch.zeros_like(r), r / torch.where(v == 0, 1.0, v))
        R_U = torch.autograd.grad(V, U, grad_outputs=R_v.to(V.dtype))[0] if len(vec) else R_v
    return U.detach(), R_U, logits, target, score


def _through_matrix_steps(
    model: BilinearModel, M: torch.Tensor, U: torch.Tensor, R_U: torch.Tensor, score: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (B, d, d) with S_c(x) = w(x) x^T Q x, and rho_c (B,).

    With U = f(M + E) (E: the first matrix step's ridge) written U = (M + E) G, G =
    (M + E)^-1 U: <R_U, U> = sum_x w(x) x^T G R_U^T x + <R_U, E G>. Without matrix steps
    Q = R_U^T and rho_c = 0.
    """
    mat = steps(model, "matrix")
    if not len(mat):
        return R_U.mT, torch.zeros_like(score)
    first = next(s for s in mat if isinstance(s, MatrixStep))
    Md = M.double()
    Mr = add_ridge(Md, first.eps, first.eps_mode)
    G = torch.linalg.lstsq(Mr, U.double()).solution
    Q = (G @ R_U.double().mT).to(R_U.dtype)
    ridge = ((R_U.double() * ((Mr - Md) @ G)).sum((-2, -1))).to(score.dtype)
    return Q, ridge


def class_contributions(
    model: BilinearModel, images: torch.Tensor, target: torch.Tensor | None = None
) -> ClassContributions:
    """Each location's share S_c(x) of class c's score (module docstring).

    Exact for classifiers linear in the descriptor (``linear``, ``lowrank``):
    ``values.sum(1) + bias + ridge == score`` up to rounding.

    Args:
        model: A one-stream model with a matrix pooling head (sum, democratic; spectral).
        images: (B, 3, H, W), uint8 or floats in [0, 1].
        target: (B,) the classes to explain; ``None``: the predicted ones.

    Raises:
        ValueError: a two-stream model, or a pooling head other than sum / democratic.
    """
    model.eval()
    feats = local_features(model, images)
    X = feats.X
    w = pooling_weights(model, X)
    M = pooled(X, w)
    U, R_U, logits, target, score = _relevance_on_matrix(model, M, target)
    bias = getattr(model.classifier, "bias", None)
    b = bias.detach()[target].to(score.dtype) if bias is not None else torch.zeros_like(score)
    Q, ridge = _through_matrix_steps(model, M, U, R_U.detach().to(X.dtype), score)
    values = w * contributions(X, Q)
    return ClassContributions(
        values.detach(), target, score.detach(), b, ridge.detach(), logits.detach(), feats.grid
    )
