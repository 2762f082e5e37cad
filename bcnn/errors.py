"""The errors bcnn raises for its users, and one clear message for each in every command.

bcnn raises ``ValueError`` (:class:`ConfigError` names the config key), ``FileNotFoundError``,
:class:`WeightsUnavailableError`, :class:`DivergenceError` and a few more (see
:func:`is_user_error`) with messages that name the key or file and the fix. Printed under
Hydra's or Python's traceback they drown in 25 lines of frames; every console script prints
them as one message instead, and the full trace when the environment sets
``HYDRA_FULL_ERROR=1`` (Hydra's own switch, used by all bcnn commands):

* :func:`user_errors`, a context manager for Hydra task functions: it re-raises a user
  error as :class:`UserError`, which Hydra prints without a traceback;
* :func:`run_command`, for argparse commands: it prints the message and returns status 1.

This module sits below every other bcnn module: any of them may raise these errors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    CompactHydraException,
    HydraException,
    InstantiationException,
    MissingConfigException,
)
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

    Hydra wraps whatever the target raises in an ``InstantiationException`` and shows its
    repr; the constructors' errors already name the key or file and the fix, and callers
    catch them by type.
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
        # A DataLoader worker's error reaches the main process rebuilt by torch as
        # ``type(err)("Caught ... in DataLoader worker ...\n<traceback text>")``: keep
        # only the original message, after the traceback's last line's type name.
        tag = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and tag in message:
            message = message.rsplit(tag, 1)[1].rstrip("\n")
        super().__init__(message)


class DivergenceError(RuntimeError):
    """The training loss (or the weights) stopped being finite; the message says where and
    which settings likely caused it."""


FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
HINT = f"(set {FULL_ERROR_ENV}=1 for the full trace)"
_PACKAGE = Path(__file__).resolve().parent

# Raised on purpose by bcnn code with a message meant for the user. Only counted when the
# raising frame is in bcnn: the same types raised deep inside torch or numpy are bugs to
# report, with their trace.
RAISED_FOR_THE_USER: tuple[type[BaseException], ...] = (
    ValueError,  # an invalid value, naming the config key
    OSError,  # FileNotFoundError (missing data, checkpoint), BadImageError, a full disk
    ImportError,  # an optional dependency, naming the extra to install
    KeyError,  # an unknown name looked up for the user (e.g. a class name)
    WeightsUnavailableError,  # offline without cached weights, naming the file to fetch
    DivergenceError,  # a non-finite loss, naming the stage, epoch, step and likely settings
)
# Configuration errors: a misspelt key, a wrong type, an unknown option. Always the user's.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    CompactHydraException,  # ConfigCompositionException, MissingConfigException, ...
    MissingConfigException,
    OmegaConfBaseException,
)


class UserError(CompactHydraException):
    """An error the user can fix; Hydra prints its message without a traceback."""


def full_trace_requested() -> bool:
    """Whether ``HYDRA_FULL_ERROR`` asks for tracebacks (any value but ``0`` / empty)."""
    return os.environ.get(FULL_ERROR_ENV, "") not in ("", "0")


def _raised_in_bcnn(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is an error bcnn raised for the user (or a config error).

    User errors: configuration errors of Hydra and OmegaConf, and ``ValueError``,
    ``OSError`` (``FileNotFoundError``, a bad image, a full disk), ``ImportError``, ``KeyError``
    and ``WeightsUnavailableError`` raised by bcnn's own code. Anything else, and these
    types raised inside another library, is a bug and keeps its traceback.
    """
    if isinstance(err, CONFIG_ERRORS):
        return True
    if isinstance(err, HydraException) and err.__cause__ is not None:
        return is_user_error(err.__cause__)
    if isinstance(err, BadImageError):  # only bcnn raises it; torch re-raises a worker's
        return True
    return isinstance(err, RAISED_FOR_THE_USER) and _raised_in_bcnn(err)


def message(err: BaseException) -> str:
    """The text shown for a user error: its message (``KeyError``'s without the quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    if isinstance(err, HydraException) and not str(err) and err.__cause__ is not None:
        return message(err.__cause__)
    return str(err) or type(err).__name__


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Inside a Hydra task function: a user error prints one message.

    In a single run the message is printed and the process exits with status 1; in a
    multirun (``-m``, a sweeper) it leaves as a :class:`UserError`, which Hydra prints
    without a traceback (and Optuna counts as a failed trial). With ``HYDRA_FULL_ERROR=1``
    the original exception passes unchanged.

    Args:
        prog: The command's name, put before the message.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if full_trace_requested() or not is_user_error(err):
            raise
        text = f"{prog}: error: {message(err)}"
        if _single_run():
            # Raised, even a compact error gets Hydra's "Error executing job with
            # overrides" line and hint around it; a single run can say it alone.
            print(f"{text}\n{HINT}", file=sys.stderr)
            raise SystemExit(1) from None
        # In a sweep, the sweeper decides: Optuna records a failed trial and goes on.
        raise UserError(text) from err


def _single_run() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


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
        if full_trace_requested() or not is_user_error(err):
            raise
        print(f"{prog}: error: {message(err)}\n{HINT}", file=sys.stderr)
        return 1
