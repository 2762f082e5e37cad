"""The errors bcnn raises for its users, and how every command prints them: one line,
``<prog>: error: <message>``, and the traceback only with ``HYDRA_FULL_ERROR=1`` (Hydra's
own switch). The foundation layer: it imports no other bcnn module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException


def show(value: Any) -> str:
    """A short, readable rendering of a config value for messages."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(ValueError):
    """An invalid config value or key.

    Attributes:
        key: The full dotted key (``pooling.gamma``, ``normalization.sqrt.eps``).
        problem: What is wrong, without the key.
        unknown: The key does not exist (rather than holding a bad value).
    """

    def __init__(self, key: str, message: str, *, unknown: bool = False) -> None:
        kind = "Unknown config key" if unknown else "Invalid config value for"
        super().__init__(f"{kind} '{key}': {message}")
        self.key, self.problem, self.unknown = key, message, unknown


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` (with ``_convert_="all"``) that lets our errors through.

    Hydra wraps what the target raises in an ``InstantiationException``; the constructors'
    errors already name the key or file and the fix, and callers catch them by type.
    """
    kwargs.setdefault("_convert_", "all")
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be obtained (offline, or none exist for the model)."""


class BadImageError(OSError):
    """An image file that is missing, truncated, too large or cannot be decoded."""

    def __init__(self, message: str) -> None:
        # torch rebuilds a DataLoader worker's error as ``type(err)("Caught ... in
        # DataLoader worker ...\n<traceback text>")``: keep the original message only.
        tag = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and tag in message:
            message = message.rsplit(tag, 1)[1].rstrip("\n")
        super().__init__(message)


class DivergenceError(RuntimeError):
    """The training loss (or the weights) stopped being finite; the message says where and
    which settings likely caused it."""


class UserError(CompactHydraException):
    """An error the user can fix; Hydra prints its message without a traceback."""


HINT = "(set HYDRA_FULL_ERROR=1 for the full trace)"
_PACKAGE = Path(__file__).resolve().parent
# Raised on purpose by bcnn with a message for the user; counted only when raised by bcnn's
# own code: the same types raised inside torch or numpy are bugs, shown with their trace.
RAISED_FOR_THE_USER = (
    ValueError,  # an invalid value, naming the config key
    OSError,  # a missing data or checkpoint file, a bad image, a full disk
    ImportError,  # an optional dependency, naming the extra to install
    KeyError,  # an unknown name looked up for the user
    WeightsUnavailableError,  # offline without cached weights, naming the file to fetch
    DivergenceError,  # a non-finite loss, naming the stage, step and likely settings
)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a configuration error of Hydra or OmegaConf, a ``BadImageError``
    (only bcnn raises it, torch re-raises a worker's) or one of ``RAISED_FOR_THE_USER``
    raised by bcnn's own code. Anything else keeps its traceback."""
    if isinstance(err, (CompactHydraException, OmegaConfBaseException, BadImageError)):
        return True
    if isinstance(err, HydraException) and err.__cause__ is not None:
        return is_user_error(err.__cause__)
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    return (
        isinstance(err, RAISED_FOR_THE_USER)
        and bool(frames)
        and Path(frames[-1].f_code.co_filename).resolve().is_relative_to(_PACKAGE)
    )


def message(err: BaseException) -> str:
    """The text shown for a user error: its message (``KeyError``'s without the quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    if isinstance(err, HydraException) and not str(err) and err.__cause__ is not None:
        return message(err.__cause__)
    return str(err) or type(err).__name__


def _one_line(prog: str, err: BaseException) -> str | None:
    """``<prog>: error: <message>`` for a user error; None where the trace is to be shown."""
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0") or not is_user_error(err):
        return None
    return f"{prog}: error: {message(err)}"


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Inside a Hydra task function: a user error prints one message.

    A single run prints it and exits with status 1. In a multirun (``-m``, a sweeper) it
    leaves as a :class:`UserError`, which Hydra prints without a traceback and Optuna
    counts as a failed trial.

    Args:
        prog: The command's name, put before the message.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        text = _one_line(prog, err)
        if text is None:
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN:
            # Raised, even a compact error gets Hydra's "Error executing job" line around it.
            print(f"{text}\n{HINT}", file=sys.stderr)
            raise SystemExit(1) from None
        raise UserError(text) from err


def run_command(
    prog: str, func: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None
) -> int:
    """Runs an argparse command's body; a user error prints one message and returns 1.

    Args:
        prog: The command's name, put before the message.
        func: The body: ``func(argv) -> exit status``.
        argv: Its arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``func``'s status, 1 after a user error, 130 after Ctrl-C.
    """
    try:
        return func(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        text = _one_line(prog, err)
        if text is None:
            raise
        print(f"{text}\n{HINT}", file=sys.stderr)
        return 1
