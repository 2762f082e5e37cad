"""What the benchmark scripts (``scripts/bench_*.py``) share: timing, the machine's
description and the result files.

Timing. :func:`measure` times short calls with :class:`torch.utils.benchmark.Timer`
(``adaptive_autorange``: warm-up, a block size that makes the timer's own cost and the
CUDA synchronisation negligible, repeats until the spread is small or the budget is spent).
:func:`time_runs` times a fixed number of runs of a fixed number of calls (training steps,
passes over a dataset, round-robin single calls), where the run count is part of the
experiment. Both take ``clock="cpu"`` for the process CPU time (``time.process_time``):
with one torch thread it is the time the work itself takes whatever else runs on a shared
machine, where wall time measures the scheduler.

Machine. :class:`RunInfo` records what every result file states: device (GPU or CPU name),
date, the exact command, torch version, threads and the load average at start and end.

Reports. :func:`write_csv` / :func:`read_csv` (optionally with ``# key: value`` lines
before the header), :func:`markdown_table`, :func:`write_markdown` and
:func:`update_readme_section` (replaces one ``## heading`` section of a README).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CLOCKS = ("wall", "cpu")

# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (CUDA); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device, kind: str = "wall") -> Callable[[], float]:
    """The timer function of ``kind`` for work on ``device``.

    Args:
        device: Where the timed work runs.
        kind: ``wall`` (``time.perf_counter``, the device synchronised before each reading)
            or ``cpu`` (``time.process_time``: this process's CPU time; CPU work only).

    Returns:
        A function returning seconds.

    Raises:
        ValueError: For an unknown ``kind``, or ``cpu`` on a device other than the CPU.
    """
    if kind not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {kind!r}")
    if kind == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"clock='cpu' counts this process's CPU time, not the work of {device}: "
                "use clock='wall' there"
            )
        return time.process_time
    if device.type == "cuda":

        def synchronized() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synchronized
    return time.perf_counter


@dataclass(frozen=True)
class Timing:
    """Timed runs of one function.

    Attributes:
        times: Seconds per call, one entry per timed run.
        number: Calls per run (each entry is a run's time divided by this).
    """

    times: tuple[float, ...]
    number: int = 1

    @property
    def best(self) -> float:
        """Fastest run, seconds per call: other processes only ever add time."""
        return min(self.times)

    @property
    def median(self) -> float:
        """Median run, seconds per call."""
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        """Mean over runs, seconds per call."""
        return statistics.fmean(self.times)

    @property
    def runs(self) -> int:
        """Number of timed runs."""
        return len(self.times)


class _EnoughRunsError(Exception):
    """Raised from the Timer's callback once ``max_runs`` runs are timed."""


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    budget_s: float = 1.0,
    max_runs: int | None = None,
    clock_kind: str = "wall",
    threshold: float = 0.1,
) -> Timing:
    """Times ``fn()`` with ``torch.utils.benchmark.Timer.adaptive_autorange``.

    The Timer warms up while it picks how many calls make one run (enough to make the timer
    and the CUDA synchronisation negligible, or a run of ``min(0.05, budget_s / 4)`` s),
    then repeats runs until their interquartile range is below ``threshold`` times the
    median (at least 4 runs), until ``budget_s`` of timed runs, or until ``max_runs`` runs.

    Args:
        fn: The call to time (its result is discarded).
        device: Where its work runs (CUDA is synchronised around each run).
        budget_s: Most seconds of timed runs (a call slower than this is timed once).
        max_runs: Most timed runs; ``None`` for no limit but the budget.
        clock_kind: ``wall`` or ``cpu`` (see :func:`clock`).
        threshold: Relative spread at which the runs are enough.

    Returns:
        The timed runs, seconds per call.
    """
    # Imported here: torch.utils.benchmark loads the C++ extension machinery.
    from torch.utils import benchmark

    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be at least 1, got {max_runs}")
    timer = benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        timer=clock(device, clock_kind),
        # The Timer's default is one thread: time what the script configured instead.
        num_threads=torch.get_num_threads(),
    )
    times: list[float] = []
    calls = [1]

    def record(number: int, seconds: float) -> None:
        calls[0] = number
        times.append(seconds / number)
        if max_runs is not None and len(times) >= max_runs:
            raise _EnoughRunsError

    # The callback stops the Timer at max_runs; it sees every timed run (not the warm-up).
    with contextlib.suppress(_EnoughRunsError):
        timer.adaptive_autorange(
            threshold=threshold,
            min_run_time=min(0.05, budget_s / 4),
            max_run_time=budget_s,
            callback=record,  # type: ignore[arg-type]
        )
    return Timing(tuple(times), calls[0])


def time_runs(
    fn: Callable[[], object],
    device: torch.device,
    *,
    runs: int,
    warmup: int = 1,
    number: int = 1,
    clock_kind: str = "wall",
) -> Timing:
    """Times ``runs`` runs of ``number`` calls of ``fn`` after ``warmup`` untimed calls.

    For calls whose count is part of the experiment (training steps, passes over images,
    round-robin single calls); for the rest use :func:`measure`.

    Args:
        fn: The call to time.
        device: Where its work runs.
        runs: Timed runs (at least 1).
        warmup: Untimed calls first (kernels, allocator, lazy initialisation).
        number: Calls per timed run.
        clock_kind: ``wall`` or ``cpu`` (see :func:`clock`).

    Returns:
        The timed runs, seconds per call.
    """
    if runs < 1 or number < 1 or warmup < 0:
        raise ValueError(
            f"need runs >= 1, number >= 1 and warmup >= 0; got {runs}, {number}, {warmup}"
        )
    now = clock(device, clock_kind)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = now()
        for _ in range(number):
            fn()
        times.append((now() - start) / number)
    return Timing(tuple(times), number)


class Deadline:
    """A soft time limit: callers check it between units of work and skip the rest.

    Args:
        seconds: Seconds from now; ``None`` never expires.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    def expired(self) -> bool:
        """Whether the limit is reached."""
        return self.seconds is not None and self.elapsed() >= self.seconds


# ----------------------------------------------------------------------------- machine


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, ``None`` where the OS has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def format_load(load: tuple[float, float, float] | None) -> str:
    """``"2.58 / 2.80 / 2.10"`` or ``"n/a"``."""
    return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)


def describe_device(device: torch.device) -> str:
    """The GPU's name and CUDA version, or the CPU's name and logical cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def _version(module: str) -> str | None:
    imported = sys.modules.get(module)
    return getattr(imported, "__version__", None) if imported else None


@dataclass
class RunInfo:
    """What every result file states about the run that produced it.

    Create it with :meth:`start` once the script has set its threads; call
    :meth:`finish` after measuring.
    """

    script: str
    argv: list[str]
    device: torch.device
    started: dt.datetime
    description: str
    load_start: tuple[float, float, float] | None
    load_end: tuple[float, float, float] | None = None
    seconds: float | None = None
    _clock_start: float = field(default_factory=time.monotonic, repr=False)

    @classmethod
    def start(cls, script: str | Path, argv: Sequence[str] | None, device: torch.device) -> RunInfo:
        """Records the start of a run.

        Args:
            script: The script's path (``__file__``); stated relative to the checkout.
            argv: Its arguments (``None``: ``sys.argv[1:]``).
            device: The benchmarked device.
        """
        path = Path(script).resolve()
        root = path.parent.parent
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        return cls(
            script=name,
            argv=list(sys.argv[1:] if argv is None else argv),
            device=device,
            started=dt.datetime.now(dt.timezone.utc),
            description=describe_device(device),
            load_start=load_average(),
        )

    def finish(self) -> RunInfo:
        """Records the end: load average and duration."""
        self.load_end = load_average()
        self.seconds = time.monotonic() - self._clock_start
        return self

    @property
    def command(self) -> str:
        """The command that reproduces the run, e.g. ``python scripts/bench_model.py --batch 2``."""
        return shlex.join(["python", self.script, *self.argv])

    @property
    def date(self) -> str:
        """Start date, ``YYYY-MM-DD HH:MM UTC``."""
        return self.started.strftime("%Y-%m-%d %H:%M UTC")

    def meta(self) -> dict[str, str]:
        """Device, date, command, versions, threads, load and duration as strings."""
        versions = f"torch {torch.__version__}"
        for module in ("torchvision", "timm"):
            if (version := _version(module)) is not None:
                versions += f", {module} {version}"
        meta = {
            "device": self.description,
            "date": self.date,
            "command": self.command,
            "versions": f"{versions}, python {platform.python_version()}",
            "torch threads": str(torch.get_num_threads()),
            "load average at start (1/5/15 min)": format_load(self.load_start),
        }
        if self.load_end is not None:
            meta["load average at end (1/5/15 min)"] = format_load(self.load_end)
        if self.seconds is not None:
            meta["wall time"] = f"{self.seconds:.0f} s"
        return meta

    def markdown(self) -> list[str]:
        """:meth:`meta` as Markdown list items (the command as code)."""
        return [
            f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}"
            for key, value in self.meta().items()
        ]


# ----------------------------------------------------------------------------- reports


def write_csv(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    fields: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``rows`` as CSV, optionally after ``# key: value`` lines.

    Args:
        path: The file (its folder is created).
        rows: One mapping per row.
        fields: Column order; default: the first row's keys. Keys not listed are dropped.
        meta: Written first as ``# key: value`` lines (read back by :func:`read_csv`).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(fields if fields is not None else (rows[0] if rows else []))
    with path.open("w", newline="") as f:
        for key, value in (meta or {}).items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str | Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Reads a file of :func:`write_csv`: its ``# key: value`` lines and its rows."""
    lines = Path(path).read_text().splitlines()
    meta = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    rows = list(csv.DictReader(line for line in lines if not line.startswith("# ")))
    return meta, rows


def cell(value: Any, spec: str = ".2f") -> str:
    """A table cell: floats formatted with ``spec``, ``—`` for None, NaN and empty strings,
    anything else (ints, text, numbers read back as text) as it is."""
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else format(value, spec)
    return str(value)


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str],
    formats: Mapping[str, str] | None = None,
) -> list[str]:
    """A Markdown table of ``rows``.

    Args:
        rows: One mapping per row.
        columns: Key -> header, in column order.
        formats: Key -> format spec of its floats (default ``.2f``), e.g. ``{"err": ".1e"}``.

    Returns:
        The table's lines.
    """
    formats = formats or {}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [cell(row.get(key), formats.get(key, ".2f")) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: str | Path, title: str, info: RunInfo | None, body: Iterable[str]) -> Path:
    """Writes ``# title``, the run's description (device, date, command, ...) and ``body``.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if info is not None:
        lines += [*info.markdown(), ""]
    lines += list(body)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


def update_readme_section(readme: str | Path, heading: str, section: str) -> None:
    """Replaces the ``## heading`` section of ``readme`` with ``section`` (or appends it).

    The other sections are left as they are; ``section`` should start with the heading.
    """
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    replacement = section.rstrip("\n") + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: replacement, text)
    else:
        text = text.rstrip("\n") + "\n\n" + replacement
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text.rstrip("\n") + "\n")
