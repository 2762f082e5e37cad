"""Reproduce a published table: one Hydra multirun of train.py, one job per row.

Installed as ``bcnn-reproduce``; ``python scripts/reproduce.py`` runs the same.

Usage::

    bcnn-reproduce list
    bcnn-reproduce table=<name> [smoke=true] [collect=true] [launcher=<name>]
        [sweep_dir=<dir>] [rows=<pattern>,...] [launch=false] [dry_run=true]
        [Hydra overrides for every job ...]

Options (``key=value``; anything else is passed to every job as a Hydra override):

    table      a table name (``list`` shows them)
    smoke      true: every row on the synthetic dataset with a small CNN on CPU
    collect    true: write the report (<sweep_dir>/report/<table>.{md,csv,tex,png})
    launch     false: do not train, only collect an existing sweep_dir
    launcher   a hydra/launcher option: joblib, submitit_local, submitit_slurm, slurm
    sweep_dir  where the jobs write (default multirun/<table>[_smoke]/<date_time>)
    rows       only the rows whose id matches one of these fnmatch patterns (e.g. *__cub*)
    dry_run    true: write the row configs and print the command, run nothing
    bench      matrix-function benchmark CSV for a timing row (talk_newton_schulz);
               default benchmarks/results/matrix_functions_<cuda|cpu>.csv of this machine

Examples::

    bcnn-reproduce table=bmvc17_table2 collect=true trainer.device=cuda
    bcnn-reproduce table=talk_nabirds smoke=true collect=true
    bcnn-reproduce table=talk_newton_schulz collect=true trainer.device=cuda
    bcnn-reproduce table=iccv15_table1 launcher=slurm \\
        hydra.launcher.partition=gpu collect=true
    bcnn-reproduce table=iccv15_table1 launch=false collect=true \\
        sweep_dir=multirun/iccv15_table1/2025-01-01_00-00-00
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bcnn.errors import run_command
from bcnn.reproduce.collect import table_report
from bcnn.reproduce.launch import launch_table
from bcnn.reproduce.tables import TABLES, get_table

OPTIONS = (
    "table",
    "smoke",
    "collect",
    "launch",
    "launcher",
    "sweep_dir",
    "rows",
    "dry_run",
    "bench",
)
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def table_list() -> str:
    """One line per table: name, row count and description."""
    width = max(len(n) for n in TABLES)
    return "\n".join(f"  {n:<{width}}  {t.description}" for n, t in TABLES.items())


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Splits ``argv`` into this script's options and the Hydra overrides for the jobs."""
    options: dict[str, str] = {}
    extra: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            options[key] = value
        else:
            extra.append(arg)
    return options, extra


def flag(options: dict[str, str], key: str, default: bool) -> bool:
    """A boolean option; exits with a message on a value that is not a boolean."""
    value = options.get(key)
    if value is None:
        return default
    if value.lower() not in BOOLEANS:
        sys.exit(f"{key}={value}: use true or false")
    return BOOLEANS[value.lower()]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status.

    A user error (a missing folder, a bad value) prints one message and returns 1.
    """
    return run_command("bcnn-reproduce", _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__ + "\nTables:\n" + table_list())
        return 0
    if argv[0] == "list":
        print(table_list())
        return 0
    options, extra = parse_args(argv)
    if "table" not in options:
        sys.exit("name a table: table=<name> (bcnn-reproduce list)")
    try:
        table = get_table(options["table"])
    except KeyError as err:
        sys.exit(str(err.args[0]))
    smoke = flag(options, "smoke", False)
    launch, collect = flag(options, "launch", True), flag(options, "collect", False)
    if "sweep_dir" in options:
        sweep_dir = Path(options["sweep_dir"])
    elif not launch:
        sys.exit("launch=false collects an existing sweep: pass sweep_dir=<dir>")
    else:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        sweep_dir = Path("multirun") / (table.name + ("_smoke" if smoke else "")) / stamp
    sweep_dir = sweep_dir.resolve()
    status = 0
    if launch:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        patterns = [p for p in options.get("rows", "").split(",") if p]
        status = launch_table(
            table,
            sweep_dir,
            smoke=smoke,
            launcher=options.get("launcher"),
            extra=extra,
            patterns=patterns,
            dry_run=flag(options, "dry_run", False),
        )
        if status:
            print(f"[reproduce] some jobs failed (exit status {status})", file=sys.stderr)
    if collect:
        report = table_report(table, sweep_dir, bench=options.get("bench"))
        done = int((report["status"] == "ok").sum())
        trained = sum(r.runnable for r in table.rows)
        print(f"[reproduce] {done}/{trained} rows done; report in {sweep_dir / 'report'}")
    print(f"[reproduce] sweep directory: {sweep_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
