"""A check of a Hydra command line before Hydra composes it: one message per mistake.

Hydra answers a mistyped key or group (``poolng=avg``) with advice to append it as a new
key (``+poolng=avg``), and an option whose plugin is not installed with a missing file.
:func:`check_overrides` names the closest existing keys instead ("did you mean
pooling=avg?"), and the extra to install. Every command with a config runs it first.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from importlib.util import find_spec
from typing import Any

from hydra import initialize_config_module
from hydra._internal.utils import get_args_parser  # the parser of @hydra.main itself
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import bcnn.config  # noqa: F401  (registers the schema that configs/train.yaml names)

# Options that a plugin provides -> (its module, the extra of bcnn that installs it).
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}


def check_overrides(prog: str, config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exits with one message when the command line names an unknown key, group or flag.

    Composes ``config_name`` with the overrides (as Hydra will again). Where that fails,
    composes it with the group selections alone and looks every other key up there; what
    Hydra explains well itself (an unknown option of a group, a bad value, a sweep over
    groups) is left to Hydra.

    Args:
        prog: The command's name, put before the message.
        config_name: Its primary config (``train``, ``eval``, ...).
        argv: The arguments (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = get_args_parser().parse_known_args(argv)
    flags = [a for a in unknown if a.startswith("--")]
    overrides = [] if flags else args.overrides
    if not overrides and not flags:
        return
    for arg in overrides:
        for prefix, (module, extra) in PLUGINS.items():
            if arg.startswith(prefix) and find_spec(module) is None:
                sys.exit(f"{prog}: error: {arg} needs a plugin: pip install 'bcnn[{extra}]'")
    try:
        # (line, parsed override): Hydra's Override types its input_line as optional.
        parsed = list(zip(overrides, OverridesParser.create().parse_overrides(overrides)))
    except HydraException:
        return  # Hydra says where the override does not parse
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        try:  # the usual case: nothing to explain
            loader.load_configuration(config_name, overrides, RunMode.MULTIRUN)
            if not flags:
                return
        except (HydraException, OmegaConfBaseException):
            pass
        # Top-level groups and Hydra's own (hydra/launcher): listing deeper is slow.
        hydra_groups = [f"hydra/{g}" for g in loader.list_groups("hydra")]
        groups = dict.fromkeys([*loader.list_groups(""), *hydra_groups])
        selected = [(line, o) for line, o in parsed if o.key_or_group in groups]
        if any(o.is_sweep_override() for _, o in selected):
            return
        try:
            lines = [line for line, _ in selected]
            cfg = loader.load_configuration(config_name, lines, RunMode.MULTIRUN)
        except (HydraException, OmegaConfBaseException):
            return  # an unknown option of a group: Hydra's message lists the options
    keys = dict.fromkeys(_paths(OmegaConf.to_container(cfg, resolve=False)))  # in order
    if flags:
        name = flags[0].lstrip("-").replace("-", "_").removeprefix("no_")
        nxt = argv[argv.index(flags[0]) + 1 :][:1]
        value = "false" if flags[0].startswith("--no-") else (nxt or ["true"])[0]
        hint = _did_you_mean(name, f"{name}={value}", keys, groups)
        sys.exit(f"{prog}: error: {flags[0]}: {prog} takes key=value arguments{hint}")
    for line, o in parsed:
        key = o.key_or_group
        if key in groups or key in keys or o.is_add() or o.is_force_add() or o.is_delete():
            continue
        hint = _did_you_mean(key, line, keys, groups)
        sys.exit(
            f"{prog}: error: {line}: no key or group {key!r} in {config_name}"
            + (hint or f" (+{line} adds one; --cfg job prints the config)")
        )


def _did_you_mean(key: str, line: str, keys: Iterable[str], groups: Iterable[str]) -> str:
    """``"; did you mean a=1 or b=1?"``: the names beside ``key`` that are spelt like it,
    else the names elsewhere that end like it (Hydra's own keys only for a Hydra key)."""
    hydra = key.startswith("hydra.")
    names = [*groups, *(k for k in keys if k.startswith("hydra.") == hydra)]
    split = {n: re.split(r"[./](?=[^./]*$)", n) for n in names}
    parent, _, leaf = key.rpartition(".")
    siblings = {s[-1]: n for n, s in split.items() if s[:-1] == ([parent] if parent else [])}
    close = [siblings[s] for s in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.75)]
    close = close or [n for n, s in split.items() if s[-1] == leaf][:3]
    value = line.partition("=")[2]
    fixes = [f"{n}={value}" if value else n for n in close]
    return f"; did you mean {' or '.join(fixes)}?" if fixes else ""


def _paths(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted path of every key of a plain config (``trainer.linear.lr``, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}"
            yield from _paths(value, f"{prefix}{key}.")
