"""Per-group optimizer settings for the presets that reproduce the authors' code (the MATLAB
classifier is not decayed, DenseNet's projection trains at lr 1e-3; docs/reproduce.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import get_class

from bcnn.errors import ConfigError
from bcnn.limits import check_node

GROUP_NAMES = ("backbone", "proj", "head")


def with_groups(
    params: Iterable[Any],
    lr: float,
    *,
    optimizer: str,
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Builds ``optimizer(params, lr=lr, **kwargs)`` with per-group settings.

    Args:
        params: Parameter groups (``{"params", "lr", "name"}`` dicts from the trainer) or
            plain tensors (then ``groups`` has nothing to act on).
        lr: The default learning rate (the trainer passes the stage's ``lr``).
        optimizer: Import path of a ``torch.optim.Optimizer`` class.
        groups: Group name (``backbone``, ``proj``, ``head``) -> settings that replace the
            group's own, e.g. ``{"head": {"weight_decay": 0.0}}``; a group absent from
            ``params`` (no projection, a frozen backbone) is skipped.
        **kwargs: The optimizer's other arguments (momentum, betas, weight_decay, ...).

    Raises:
        ValueError: an unknown group name or setting, or not an optimizer class.
    """
    groups = {str(k): dict(v) for k, v in (groups or {}).items()}
    if unknown := sorted(set(groups) - set(GROUP_NAMES)):
        raise ValueError(
            f"with_groups: unknown group(s) {unknown} in 'groups'; the trainer's groups are "
            f"{list(GROUP_NAMES)}"
        )
    cls = get_class(optimizer)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"with_groups: optimizer={optimizer!r} is not a torch optimizer class")
    named = [g if isinstance(g, dict) else {"params": [g]} for g in params]
    build: Any = cls  # each optimizer class takes its own keyword arguments
    opt = build([{**g, **groups.get(str(g.get("name")), {})} for g in named], lr=lr, **kwargs)
    for name, settings in groups.items():
        if extra := sorted(set(settings) - set(opt.defaults)):
            raise ValueError(
                f"with_groups: groups.{name} sets {extra}, which {cls.__name__} does not "
                f"have; its settings are {sorted(opt.defaults)}"
            )
    return opt


def _config_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The other keys are arguments of ``optimizer``: checked as its own config node."""
    node = {k: v for k, v in values.items() if k not in ("optimizer", "groups")}
    try:
        check_node(
            {"_target_": values["optimizer"], "_partial_": True, **node}, "", ("params", "lr")
        )
    except ConfigError as err:
        return err.key[1:].replace("_target_", "optimizer"), err.problem
    return None


with_groups.config_problem = _config_problem  # type: ignore[attr-defined]
