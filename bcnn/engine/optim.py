"""torch's optimizers and schedules (same state dict, same behaviour) with annotated
signatures, so that ``bcnn.config.validate`` refuses ``momentum=5`` or ``gamma=10`` by key
before any work (torch checks only some of its arguments)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt, Interval, Lt

from bcnn.limits import NonNegative, PositiveInt, checked

Params = Iterable[Any]
Momentum = Annotated[float, Interval(ge=0, lt=1)]
# Beyond 1 the decay outweighs any gradient of a normalized descriptor: a typo.
Decay = Annotated[float, Interval(ge=0, le=1)]
Betas = tuple[Momentum, Momentum]
Eps = Annotated[float, Gt(0), Lt(1)]


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` with declared limits."""

    @staticmethod
    def config_problem(values: dict[str, Any]) -> tuple[str, str] | None:
        """torch's rule: Nesterov momentum needs a momentum and no dampening."""
        if values["nesterov"] and not (values["momentum"] > 0 and values["dampening"] == 0):
            return "nesterov", "needs momentum > 0 and dampening = 0"
        return None

    @checked
    def __init__(
        self,
        params: Params,
        lr: Annotated[float, Gt(0)] = 1e-3,
        momentum: Momentum = 0.0,
        dampening: Momentum = 0.0,
        weight_decay: Decay = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov,
        )  # fmt: skip


class _AdamArguments:
    """The arguments of Adam and AdamW (AdamW's default decay is the config's, not 1e-2)."""

    @checked
    def __init__(
        self,
        params: Params,
        lr: Annotated[float, Gt(0)] = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: Eps = 1e-8,
        weight_decay: Decay = 0.0,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad,
        )  # fmt: skip


class Adam(_AdamArguments, torch.optim.Adam):
    """``torch.optim.Adam`` (coupled L2 decay) with declared limits."""


class AdamW(_AdamArguments, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled decay) with declared limits."""


Factor = Annotated[float, Interval(gt=0, le=1)]


class StepLR(torch.optim.lr_scheduler.StepLR):
    """``StepLR``: the rate times ``gamma`` (a decay, at most 1) every ``step_size`` epochs."""

    @checked
    def __init__(self, optimizer: Any, step_size: PositiveInt, gamma: Factor = 0.1) -> None:
        super().__init__(optimizer, step_size=step_size, gamma=gamma)


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """``CosineAnnealingLR`` to ``eta_min`` over ``T_max`` epochs."""

    @checked
    def __init__(self, optimizer: Any, T_max: PositiveInt, eta_min: NonNegative = 0.0) -> None:
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)


class ConstantLR(torch.optim.lr_scheduler.ConstantLR):
    """``ConstantLR``: the rate times ``factor`` for ``total_iters`` epochs."""

    @checked
    def __init__(
        self, optimizer: Any, factor: Factor = 1.0, total_iters: Annotated[int, Ge(0)] = 0
    ) -> None:
        super().__init__(optimizer, factor=factor, total_iters=total_iters)


class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """``ReduceLROnPlateau``: the rate times ``factor`` after ``patience`` epochs without a
    better monitored metric (``mode``: ``max`` for the accuracies bcnn monitors)."""

    @checked
    def __init__(
        self,
        optimizer: Any,
        mode: Literal["min", "max"] = "max",
        factor: Annotated[float, Interval(gt=0, lt=1)] = 0.1,
        patience: Annotated[int, Ge(0)] = 10,
        threshold: NonNegative = 1e-4,
        cooldown: Annotated[int, Ge(0)] = 0,
        eps: NonNegative = 1e-8,
    ) -> None:
        super().__init__(
            optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
            cooldown=cooldown, eps=eps,
        )  # fmt: skip
