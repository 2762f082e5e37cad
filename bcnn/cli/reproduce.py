"""``bcnn-reproduce`` (= ``python scripts/reproduce.py``, ``configs/reproduce.yaml``):
train and report a published table, one Hydra multirun of train.py with a job per row; an
override for every job is added with a ``+`` (``+trainer.device=cuda``). And
``bcnn-summarize-sweep``, the summary of any sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bcnn.cli.overrides import check_overrides
from bcnn.errors import run_command, user_errors
from bcnn.reproduce.collect import summarize_sweep, table_report
from bcnn.reproduce.launch import launch_table
from bcnn.reproduce.tables import TABLES, get_table

PROG = "bcnn-reproduce"


def table_list() -> str:
    """One line per table: its name and description."""
    width = max(len(n) for n in TABLES)
    return "\n".join(f"  {n:<{width}}  {t.description}" for n, t in TABLES.items())


def reproduce(cfg: DictConfig, extra: Sequence[str] = ()) -> int:
    """Launches and/or collects ``cfg.table`` (``configs/reproduce.yaml``).

    Args:
        cfg: The composed config.
        extra: Overrides for every job (``trainer.device=cuda``, ...).

    Returns:
        The exit status of the multirun (0 when every job succeeded, or nothing ran).

    Raises:
        KeyError: an unknown table.
        ValueError: ``launch=false`` without ``sweep_dir``.
    """
    if cfg.table is None:
        print(f"{PROG} table=<name> [smoke=true] [collect=true] ...; the tables:")
        print(table_list())
        return 0
    table = get_table(cfg.table)
    if cfg.sweep_dir is None and not cfg.launch:
        raise ValueError("launch=false collects an existing sweep: pass sweep_dir=<dir>")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    default = Path("multirun") / (table.name + ("_smoke" if cfg.smoke else "")) / stamp
    sweep_dir = Path(cfg.sweep_dir or default).resolve()
    status = 0
    if cfg.launch:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        rows = cfg.rows or []
        status = launch_table(
            table,
            sweep_dir,
            smoke=cfg.smoke,
            launcher=cfg.launcher,
            extra=extra,
            patterns=[rows] if isinstance(rows, str) else list(rows),
            dry_run=cfg.dry_run,
        )
        if status:
            print(f"[reproduce] some jobs failed (exit status {status})", file=sys.stderr)
    if cfg.collect:
        report = table_report(table, sweep_dir, bench=cfg.bench)
        done = int((report["status"] == "ok").sum())
        trained = sum(r.runnable for r in table.rows)
        print(f"[reproduce] {done}/{trained} rows done; report in {sweep_dir / 'report'}")
    print(f"[reproduce] sweep directory: {sweep_dir}")
    return status


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="reproduce")
def _hydra_main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides
    # +key=value: for the jobs, without its +.
    extra = [o[1:] for o in [*overrides.task, *overrides.hydra] if o.startswith("+")]
    GlobalHydra.instance().clear()  # launch_table composes the rows with Hydra's compose API
    with user_errors(PROG):
        status = reproduce(cfg, extra)
    if status:
        sys.exit(status)


def main() -> None:
    """``bcnn-reproduce``: trains and reports a published table."""
    check_overrides(PROG, "reproduce")
    _hydra_main()


def summarize_main(argv: Sequence[str] | None = None) -> int:
    """``bcnn-summarize-sweep <sweep_dir> [out_dir]``; returns 1 when the folder holds no job."""
    parser = argparse.ArgumentParser(
        prog="bcnn-summarize-sweep",
        description="Writes summary.csv and summary.md of every job of a multirun (default: "
        "into it) and prints the Markdown.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory of train.py")
    parser.add_argument("out_dir", type=Path, nargs="?", help="where to write (the sweep)")
    args = parser.parse_args(argv)

    def body(_: object) -> int:
        if not args.sweep_dir.is_dir():
            raise FileNotFoundError(f"no such directory: {args.sweep_dir}")
        jobs = summarize_sweep(args.sweep_dir, args.out_dir)
        print((Path(args.out_dir or args.sweep_dir) / "summary.md").read_text())
        return 0 if len(jobs) else 1

    return run_command("bcnn-summarize-sweep", body, argv)
