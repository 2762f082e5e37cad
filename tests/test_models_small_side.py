"""Sum pooling + a matrix step takes the n x n route when cheaper, with the same results."""

from __future__ import annotations

import pytest
import torch

from bcnn.models import build_model
from bcnn.ops import resolve_sqrtm
from tests.conftest import compose_config

# Two blocks of the small CNN on 16x16 images: an 8x8 map (n = 64) of d = 160 channels.
BASE = ["backbone.channels=[16,160]", "pooling=sum"]
CASES = {
    "sqrt_eigh": ["normalization=sqrt_l2", "normalization.sqrt.method=eigh",
                  "normalization.sqrt.backward=auto"],
    "sqrt_ns_autograd": ["normalization=sqrt_signsqrt_l2", "normalization.sqrt.backward=autograd"],
    "power": ["pooling=spectral", "normalization.mpow.p=0.3", "normalization=l2"],
    "log": ["normalization=log_signsqrt_l2"],
}  # fmt: skip


def _model(overrides: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(compose_config([*BASE, *overrides]), 3).double()
    torch.nn.init.normal_(model.classifier.weight)
    return model


def _dxd(model, images: torch.Tensor) -> torch.Tensor:
    """The d x d route spelled out: pool A, then every step of the chain."""
    fmap = model.backbone(model.normalize_input(images))
    return model.normalization(model.pooling(fmap))


@pytest.mark.parametrize("case", sorted(CASES))
def test_small_side_route_matches_the_dxd_route_in_value_and_gradient(case: str) -> None:
    model = _model(CASES[case])
    step = model.normalization.leading_matrix_step()
    assert step is not None and step.small_side(64, 160, "cpu") is not None  # taken here
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    small, dxd = model.features(images), _dxd(model, images)
    torch.testing.assert_close(small, dxd, rtol=1e-7, atol=1e-10)
    grads = []
    for fn in (model.features, lambda x: _dxd(model, x)):
        model.zero_grad()
        (fn(images) * torch.linspace(-1, 1, small.shape[-1], dtype=torch.float64)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.backbone.parameters()]))
    # Relative error of the whole gradient (the log's d x d route loses a few digits of
    # log(1 + l) for eigenvalues far below the ridge: elementwise checks would measure that).
    assert (grads[0] - grads[1]).norm() <= 1e-6 * grads[1].norm()


def test_published_backward_choices_keep_the_dxd_route() -> None:
    # The iterative Lyapunov gradient (BMVC 2017) is another approximation: not reproduced
    # by the n x n route, so the model keeps the d x d one.
    model = _model(["normalization=sqrt_l2", "normalization.sqrt.backward=lyapunov_iterative"])
    assert model.normalization.leading_matrix_step().small_side(64, 160, "cpu") is None
    # More locations than channels: never the small side.
    model = _model(CASES["sqrt_eigh"])
    assert model.normalization.leading_matrix_step().small_side(256, 160, "cpu") is None


def test_shipped_chains_let_the_backward_follow_the_method() -> None:
    # Issue 16.2: normalization.sqrt.method=eigh must not keep the iterative backward.
    for chain in ("sqrt_l2", "sqrt_signsqrt_l2"):
        cfg = compose_config([f"normalization={chain}", "normalization.sqrt.method=eigh"])
        model = build_model(cfg, 3)
        step = model.normalization.steps["sqrt"]
        assert resolve_sqrtm(step.method, step.backward, "cpu", 512) == ("eigh", "lyapunov_eig")
        default = build_model(compose_config([f"normalization={chain}"]), 3)
        step = default.normalization.steps["sqrt"]
        assert resolve_sqrtm(step.method, step.backward, "cpu", 512) == (
            "newton_schulz",
            "lyapunov_iterative",
        )
