r"""Where a second-order descriptor looks: per-location contributions.

Notation (the talk; Lin, Maji & Koniusz, ECCV 2018). An image gives n local features
x_1 .. x_n (the locations of the map the pooling head reads, after its optional
projection), phi(x) = x x^T, and a pooled descriptor xi(X) = sum_x w(x) phi(x) with
pooling weights w(x) that sum to 1:

* sum pooling: w(x) = 1/n, xi = A = (1/n) sum_x x x^T;
* gamma-democratic pooling: w(x) = alpha(x) / sum_y alpha(y) with the dampened-Sinkhorn
  weights alpha of ``bcnn.ops.democratic_weights`` (what ``DemocraticPool`` computes).

The **contribution** of a feature is C(x) = <phi(x), xi> = x^T xi x. By construction

    sum_x w(x) C(x) = <xi, xi> = ||xi||_F^2,                                     (1)

so w(x) C(x) / ||xi||^2 is location x's share of the descriptor's energy. Democratic
weights make these shares follow (K 1)^gamma (K_ij = (x_i^T x_j)^2): at gamma = 0 every
w(x) C(x) is the same, 1/n of ||xi||^2, i.e. C(x) is proportional to 1/alpha(x).

For **matrix normalization** xi_f = f(A) (the matrix square root, A^p, log) the contribution
to f(A) is C_f(x) = <phi(x), f(A)> = x^T f(A) x, and (1) becomes
sum_x (1/n) C_f(x) = <A, f(A)>. The shares (1/n) C_f(x) / <A, f(A)> flatten as p decreases
(the paper's equalization argument).

The **class-specific map** S_c(x) splits the score s_c of class c (a logit) over the
locations, exactly:

    sum_x S_c(x) = s_c - b_c - rho_c,

with b_c the classifier's bias and rho_c the share of the ridge eps I of a matrix step
(0 without matrix steps). It is a conservative, proportional (LRP-epsilon-0 / "z-rule")
decomposition through the head:

1. The classifier reads the normalized descriptor z; for a linear classifier
   s_c - b_c = sum_k r_k with r_k = z_k ds_c/dz_k = W_ck z_k, the relevance of coordinate k
   (gradient x input on z; exact because s_c is linear in z).
2. The elementwise steps (signed square root, L2) map each coordinate v_k of the
   vectorized matrix V = vec(U) to z_k = h_k(v) v_k with h_k(0) finite: coordinate k's
   relevance is passed to v_k in full, as a relevance per unit of v_k,
   R_k = r_k / v_k (0 where v_k = 0, whose z_k and r_k are 0 too).
   Then <R, V> = sum_k r_k, and R is carried back through the (linear) vectorization to a
   d x d matrix R_U with <R_U, U> = s_c - b_c.
3. Without matrix steps U = M = sum_x w(x) x x^T, so S_c(x) = w(x) x^T R_U^T x.
   With a matrix function U = f(M + E) (E = eps I, the ridge of the first matrix step),
   write U = (M + E) G with G = (M + E)^{-1} U (for f(M) = M^p: G = M^{p-1}); then
   <R_U, U> = sum_x w(x) x^T G R_U^T x + <R_U, E G>, and
   S_c(x) = w(x) x^T G R_U^T x, rho_c = <R_U, E G>.

Without elementwise steps and matrix functions (``normalization=none``) S_c(x) is the plain
w(x) x^T W_c x, where W_c is class c's weight vector folded to d x d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bcnn.models.model import BilinearModel
from bcnn.models.normalization import MatrixStep, add_ridge
from bcnn.models.pooling import BilinearPool, DemocraticPool, locations
from bcnn.ops import democratic_weights


@dataclass
class LocalFeatures:
    """The features a pooling head reads, one row per location.

    Attributes:
        X: (B, n, d), n = h w locations in row-major order, float32.
        grid: (h, w) of the map.
    """

    X: torch.Tensor
    grid: tuple[int, int]


@torch.no_grad()
def local_features(model: BilinearModel, images: torch.Tensor) -> LocalFeatures:
    """The (projected) feature map of ``model`` at each location.

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
    """C(x) = x^T xi x = <phi(x), xi> at every location.

    Args:
        X: (B, n, d) features.
        xi: (B, d, d) a descriptor in the span of the phi's (pooled or matrix-normalized).

    Returns:
        (B, n).
    """
    return torch.einsum("bnd,bde,bne->bn", X, xi.to(X.dtype), X)


def pooled(X: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """xi = sum_x w(x) x x^T, (B, n, d) and (B, n) -> (B, d, d)."""
    return torch.einsum("bn,bnd,bne->bde", weights.to(X.dtype), X, X)


@dataclass
class Contributions:
    """Per-location contributions to one descriptor.

    Attributes:
        values: (B, n) C(x).
        weights: (B, n) the pooling weights w(x) (sum 1 per image).
        descriptor: (B, d, d) xi (or f(A)).
        alpha: (B, n) the raw democratic weights (democratic pooling only).
    """

    values: torch.Tensor
    weights: torch.Tensor
    descriptor: torch.Tensor
    alpha: torch.Tensor | None = None

    def shares(self) -> torch.Tensor:
        """(B, n) w(x) C(x) / sum_y w(y) C(y): each location's share of the total."""
        wc = self.weights * self.values
        return wc / wc.sum(1, keepdim=True).clamp_min(torch.finfo(wc.dtype).tiny)


def sum_contributions(X: torch.Tensor) -> Contributions:
    """Sum pooling: w(x) = 1/n, xi = A; sum_x w C = ||A||_F^2.

    Args:
        X: (B, n, d).
    """
    w = torch.full(X.shape[:2], 1.0 / X.shape[1], dtype=X.dtype, device=X.device)
    xi = pooled(X, w)
    return Contributions(contributions(X, xi), w, xi)


def democratic_contributions(
    X: torch.Tensor, gamma: float = 0.5, tau: float = 0.5, iters: int = 10
) -> Contributions:
    """gamma-democratic pooling: w = alpha / sum alpha; sum_x w C = ||xi||_F^2.

    Args:
        X: (B, n, d).
        gamma, tau, iters: As ``bcnn.ops.democratic_weights``.
    """
    alpha = democratic_weights(X, gamma=gamma, tau=tau, iters=iters).to(X.dtype)
    w = alpha / alpha.sum(1, keepdim=True)
    xi = pooled(X, w)
    return Contributions(contributions(X, xi), w, xi, alpha)


def matrix_contributions(
    X: torch.Tensor, function: nn.Module | None = None, p: float = 0.5, eps: float = 1e-4
) -> Contributions:
    """Matrix-normalized sum pooling: C_f(x) = x^T f(A) x; sum_x (1/n) C_f = <A, f(A)>.

    Args:
        X: (B, n, d).
        function: f, a module mapping (B, d, d) to (B, d, d) (e.g. the matrix steps of a
            model's chain); ``None``: (A + eps tr(A)/d I)^p by eigendecomposition.
        p: The power when ``function`` is None.
        eps: The relative ridge when ``function`` is None.
    """
    w = torch.full(X.shape[:2], 1.0 / X.shape[1], dtype=X.dtype, device=X.device)
    A = pooled(X, w)
    if function is None:
        from bcnn.ops import powm

        fA = powm(add_ridge(A.double(), eps, "trace"), p).to(X.dtype)
    else:
        fA = function(A).to(X.dtype)
    return Contributions(contributions(X, fA), w, fA)


def pooling_weights(model: BilinearModel, X: torch.Tensor) -> torch.Tensor:
    """The weights w(x) with which ``model``'s head pools X: (B, n, d) -> (B, n).

    Raises:
        ValueError: a head that is not a sum of weighted outer products.
    """
    head = model.pooling
    if isinstance(head, DemocraticPool):
        alpha = democratic_weights(X, gamma=head.gamma, tau=head.tau, iters=head.iters)
        return (alpha / alpha.sum(1, keepdim=True)).to(X.dtype)
    if isinstance(head, BilinearPool):
        return torch.full(X.shape[:2], 1.0 / X.shape[1], dtype=X.dtype, device=X.device)
    raise ValueError(
        f"class-specific maps need a matrix pooling head (pooling=sum, democratic or "
        f"spectral); this model pools with {type(head).__name__}"
    )


def _phase(model: BilinearModel, phase: str) -> nn.Sequential:
    """One phase of ``model``'s normalization chain, as one module (maybe empty)."""
    return nn.Sequential(*(s for s in model.normalization.steps.values() if s.phase == phase))


def matrix_steps(model: BilinearModel) -> nn.Sequential:
    """The matrix phase of ``model``'s normalization chain, as one module (maybe empty)."""
    return _phase(model, "matrix")


@dataclass
class ClassContributions:
    """A class's score split over locations (module docstring).

    Attributes:
        values: (B, n) S_c(x).
        target: (B,) the class c of each image.
        score: (B,) s_c, the logit.
        bias: (B,) b_c (0 without a bias).
        ridge: (B,) rho_c, the ridge's share (0 without matrix steps).
        logits: (B, num_classes).
        grid: (h, w) of the map.
    """

    values: torch.Tensor
    target: torch.Tensor
    score: torch.Tensor
    bias: torch.Tensor
    ridge: torch.Tensor
    logits: torch.Tensor
    grid: tuple[int, int]


def _matrix_relevance(
    model: BilinearModel, M: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of the module docstring: class c's relevance on U = f(M).

    Args:
        model: The model (its normalization chain and classifier).
        M: (B, d, d) pooled matrices.
        target: (B,) the classes to explain; ``None``: the predicted ones.

    Returns:
        ``(U, R_U, logits, target, score)``: U (B, d, d) after the matrix steps (detached),
        R_U (B, d, d) with <R_U, U> = s_c - b_c, logits (B, C), target (B,) and the
        explained scores s_c (B,).
    """
    mat, vec = _phase(model, "matrix"), _phase(model, "vectorize")
    elem = _phase(model, "elementwise")
    with torch.enable_grad():
        U = mat(M).detach().requires_grad_(True)
        V = vec(U)
        Vd = V.detach().requires_grad_(True)
        Z = elem(Vd)
        logits = model.classifier(Z)
        if target is None:
            target = logits.argmax(1)
        target = target.to(logits.device)
        score = logits.gather(1, target[:, None])[:, 0]
        (gZ,) = torch.autograd.grad(score.sum(), Z, retain_graph=True)
        r = (gZ * Z).detach()
        zero = Vd.detach() == 0
        R_v = torch.where(zero, torch.zeros_like(r), r / torch.where(zero, 1.0, Vd.detach()))
        # vec is linear: its adjoint carries the relevance per unit back onto U's entries.
        if len(vec):
            (R_U,) = torch.autograd.grad(V, U, grad_outputs=R_v.to(V.dtype))
        else:
            R_U = R_v
    return U.detach(), R_U, logits, target, score


def _class_bias(model: BilinearModel, target: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """b_c of each image's class c (B,); zeros for a classifier without a bias."""
    bias_param = getattr(model.classifier, "bias", None)
    if isinstance(bias_param, torch.Tensor):
        return bias_param.detach()[target].to(score.dtype)
    return torch.zeros_like(score)


def _through_matrix_steps(
    model: BilinearModel, M: torch.Tensor, U: torch.Tensor, R_U: torch.Tensor, score: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of the module docstring: the relevance back through the matrix function.

    Args:
        model: The model (its matrix steps).
        M: (B, d, d) pooled matrices.
        U: (B, d, d) M after the matrix steps.
        R_U: (B, d, d) relevance on U, in the features' dtype.
        score: (B,) the explained scores (dtype and device of the ridge share).

    Returns:
        ``(Q, ridge)``: Q (B, d, d) with S_c(x) = w(x) x^T Q x, and rho_c (B,).
    """
    mat = matrix_steps(model)
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

    Exact for classifiers linear in the descriptor (``classifier=linear``, ``lowrank``):
    ``values.sum(1) + bias + ridge == score`` up to rounding.

    Args:
        model: A one-stream model with a matrix pooling head (sum, democratic; spectral).
        images: (B, 3, H, W), uint8 or floats in [0, 1].
        target: (B,) the classes to explain; ``None``: the predicted ones.

    Returns:
        ``ClassContributions``.

    Raises:
        ValueError: a two-stream model, or a pooling head other than sum / democratic.
    """
    model.eval()
    feats = local_features(model, images)
    X = feats.X
    w = pooling_weights(model, X)
    M = pooled(X, w)
    U, R_U, logits, target, score = _matrix_relevance(model, M, target)
    bias = _class_bias(model, target, score)
    Q, ridge = _through_matrix_steps(model, M, U, R_U.detach().to(X.dtype), score)
    values = w * contributions(X, Q)
    return ClassContributions(
        values.detach(),
        target.detach(),
        score.detach(),
        bias,
        ridge.detach(),
        logits.detach(),
        feats.grid,
    )
