"""One clear message for the errors a user can fix, in every command.

bcnn raises ``ValueError`` / ``FileNotFoundError`` / ``WeightsUnavailableError`` (and a
few more, see :func:`is_user_error`) with messages that name the key or file and the fix.
Printed under Hydra's or Python's traceback they drown in 25 lines of frames; every
console script prints them as one message instead, and the full trace when the
environment sets ``HYDRA_FULL_ERROR=1`` (Hydra's own switch, used by all bcnn commands).

Two entry points:

* :func:`user_errors`, a context manager for Hydra task functions: it re-raises a user
  error as :class:`UserError`, which Hydra prints without a traceback.
* :func:`run_command`, for argparse commands: it prints the message and returns exit
  status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from bcnn.data.base import BadImageError
from bcnn.engine.trainer import DivergenceError
from bcnn.models.backbones.base import WeightsUnavailableError

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
HINT = f"(set {FULL_ERROR_ENV}=1 for the full trace)"
_PACKAGE = Path(__file__).resolve().parents[1]

# Raised on purpose by bcnn code with a message meant for the user. Only counted when the
# raising frame is in bcnn: the same types raised deep inside torch or numpy are bugs to
# report, with their trace.
RAISED_FOR_THE_USER: tuple[type[BaseException], ...] = (
    ValueError,  # an invalid value, naming the config key
    OSError,  # FileNotFoundError (missing data, checkpoint), BadImageError, a full disk
    ImportError,  # an optional dependency, naming the extra to install
    KeyError,  # an unknown name looked up for the user (e.g. a class name)
    WeightsUnavailableError,  # offline without cached weights, naming the file to fetch
    BadImageError,
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
    ``OSError`` (``FileNotFoundError``, ``BadImageError``), ``ImportError``, ``KeyError``
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


__all__ = [
    "CONFIG_ERRORS",
    "FULL_ERROR_ENV",
    "RAISED_FOR_THE_USER",
    "UserError",
    "full_trace_requested",
    "is_user_error",
    "message",
    "run_command",
    "user_errors",
]
