"""Launch a table: one Hydra multirun of ``train.py`` with exactly one job per row.

The rows of a table are not a cartesian product (``CUB+box`` exists only for CUB, the
ECCV 2018 gamma differs per dataset), so each job becomes a generated config of the
``experiment`` group in ``<sweep_dir>/.rows/`` (its preset plus the row's overrides), and
the multirun sweeps over them: ``python -m bcnn.train --multirun experiment=<job>,...
hydra.searchpath=[file://<sweep_dir>/.rows] hydra.sweep.subdir=<job> [extra]``. A job is
named by its row id (``<row id>__split<k>`` for a row's repeats); ``reproduce.json``
records the rows and the command. Before anything runs, every job must compose and the
dataset folders and weights files it names must exist (what is missing is listed once).

Smoke mode keeps every row's head, stages, recipe and data protocol but swaps the backbone
for the small CNN (two for a two-stream row), the budget for ``debug=smoke``'s epochs (run
whole, on CPU) and each dataset for its own stand-in: the synthetic set with a seed and
class count derived from the dataset's name, so that a row's columns are different runs.
Backbone and dataset nodes are first reset to null (``reproduce/smoke_reset``): a preset's
keys for the real ones (``pretrained``, ``partition``) would be merged into the small ones.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from bcnn.config import instantiate
from bcnn.reproduce.tables import Row, Table

ROWS_DIR = ".rows"
MANIFEST = "reproduce.json"
RESET_CONFIG = "reproduce/smoke_reset"

# Smoke sizes (the seed and class count: smoke_dataset). Compact pooling's sketch shrinks
# to SMOKE_SKETCH_DIM: 8192 dimensions per location made a smoke job take a minute. The
# row keeps its gradient accumulation (a step per micro-batch of 8 at the recipe's rate
# collapsed fine-tuned classifiers onto a few classes); debug=smoke's epochs run whole.
SMOKE_DATASET: dict[str, Any] = {"trainval_size": 384, "test_size": 512, "image_size": 16}
SMOKE_CHANNELS = [8]
SMOKE_SPLITS = 2  # repeats run per row with splits
SMOKE_SKETCH_DIM = 512
SMOKE_TRAINER: dict[str, Any] = {"device": "cpu", "precision": "32", "num_workers": 0}
SMOKE_TRAINER |= {"eval_batch_size": 256, "limit_train_batches": None, "limit_eval_batches": None}


def split_overrides(overrides: Iterable[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Splits Hydra overrides (``group=option``, ``a.b.c=value``) into group choices
    (``{"dataset": "cub"}``) and a nested dict of values (``{"trainer": {"stages": [...]}}``).

    Raises:
        ValueError: a sweep, deletion, addition or list-index override, which a config
            file cannot express.
    """
    parser = OverridesParser.create()
    root = resources.files("bcnn.configs")
    groups = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}
    choices: dict[str, str] = {}
    body = OmegaConf.create()
    for text in overrides:
        o = parser.parse_override(text)
        if o.is_sweep_override() or o.is_delete() or o.is_add() or o.package:
            raise ValueError(f"row override {text!r}: use plain group=option or key=value")
        if o.key_or_group in groups:
            choices[o.key_or_group] = str(o.value())
        elif any(p.isdigit() for p in o.key_or_group.split(".")):
            raise ValueError(
                f"row override {text!r} indexes a list, which a config file cannot merge: "
                "put the whole list in an experiment file"
            )
        else:
            OmegaConf.update(body, o.key_or_group, o.value(), force_add=True)
    return choices, OmegaConf.to_container(body)  # type: ignore[return-value]


def _group_node(group: str, option: str) -> dict[str, Any]:
    with (resources.files("bcnn.configs") / group / f"{option}.yaml").open() as f:
        return OmegaConf.to_container(OmegaConf.load(f))  # type: ignore[return-value]


def row_jobs(row: Row, smoke: bool = False) -> list[tuple[str, int | None]]:
    """The jobs of a row: ``(job id, split index or None)``; smoke runs ``SMOKE_SPLITS``."""
    if not row.splits:
        return [(row.id, None)]
    jobs: list[tuple[str, int | None]] = list(zip(row.job_ids, range(len(row.splits))))
    return jobs[:SMOKE_SPLITS] if smoke else jobs


def smoke_nodes(real: DictConfig, split: int | None) -> dict[str, Any]:
    """The nodes smoke mode puts into a row's config, from the row's composed ``real`` one.

    The small CNN (a pair of them for a two-stream backbone); the synthetic stand-in of the
    row's dataset at smoke sizes, with its validation fraction and a seed and class count
    (4 to 6) derived from the dataset's name, so that each dataset column trains on data of
    its own (a split moves to a further seed); compact pooling's sketch at
    ``SMOKE_SKETCH_DIM``; a PCA projection at most the small CNN's channels (PCA has no more
    directions).
    """
    small = {**_group_node("backbone", "small"), "channels": list(SMOKE_CHANNELS)}
    two = {"_target_": real.backbone._target_, "stream_a": small, "stream_b": dict(small)}
    code = zlib.crc32(str(real.dataset.name).encode())
    own = {"num_classes": 4 + code % 3, "seed": code % 10_000 + (split or 0)}
    val_fraction = float(real.dataset.get("val_fraction") or 0.0)
    dataset = {**_group_node("dataset", "synthetic"), **SMOKE_DATASET, **own}
    nodes: dict[str, Any] = {
        "backbone": two if "stream_a" in real.backbone else small,
        "dataset": {**dataset, "val_fraction": val_fraction},
        "trainer": SMOKE_TRAINER,
    }
    pooling, dim = real.pooling, real.pooling.get("proj_dim")
    if "sketch" in pooling:
        nodes["pooling"] = {"sketch": {"out_dim": SMOKE_SKETCH_DIM}}
    if pooling.get("proj_init") == "pca" and dim and dim > SMOKE_CHANNELS[-1]:
        nodes.setdefault("pooling", {})["proj_dim"] = SMOKE_CHANNELS[-1]
    return nodes


def row_config(
    row: Row, table: Table, split: int | None = None, smoke: dict[str, Any] | None = None
) -> str:
    """The YAML text of a row's generated experiment config.

    Args:
        row: The row.
        table: Its table (named in the header comment).
        split: Index into ``row.splits`` of the job's repeat (None: no repeats).
        smoke: The smoke version's nodes (:func:`smoke_nodes`); None: the full run.
    """
    overrides = [*row.overrides, *([row.splits[split]] if split is not None else [])]
    choices, body = split_overrides(overrides)
    experiment = choices.pop("experiment", None)
    defaults: list[Any] = [f"/experiment/{experiment}"] if experiment else []
    if smoke:
        choices.update(backbone="small", dataset="synthetic")
        body = {k: v for k, v in body.items() if k not in ("backbone", "dataset")}
        body = OmegaConf.to_container(OmegaConf.merge(body, smoke))  # type: ignore[assignment]
        defaults += [f"/{RESET_CONFIG}", "/debug/smoke"]
    defaults += ["_self_", *({f"override /{g}": o} for g, o in choices.items())]
    kind = "SMOKE: stand-in data, small CNN" if smoke else "full run"
    header = [
        "# @package _global_",
        f"# Generated by scripts/reproduce.py ({kind}).",
        f"# {table.title}: {row.label} | {' | '.join(row.columns)}",
        f"# Row overrides: {' '.join(overrides)}",
    ]
    text = OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults, **body}))
    return "\n".join(header) + "\n" + text


def _quote(text: str) -> str:
    """A Hydra override value quoted so that spaces, commas or brackets stay literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def searchpath_override(rows_dir: Path) -> str:
    """``hydra.searchpath=['file://<rows_dir>']``: adds the generated configs to Hydra's path."""
    return f"hydra.searchpath=[{_quote('file://' + str(Path(rows_dir).resolve()))}]"


def _compose(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def select_rows(table: Table, patterns: Sequence[str] = ()) -> list[Row]:
    """The rows of ``table`` whose id matches one of the fnmatch ``patterns`` (all if none)."""
    if not patterns:
        return list(table.rows)
    rows = [r for r in table.rows if any(fnmatch.fnmatch(r.id, p) for p in patterns)]
    if not rows:
        raise ValueError(f"no row of {table.name} matches {list(patterns)}")
    return rows


def write_rows(
    table: Table, rows: Sequence[Row], rows_dir: Path, smoke: bool, extra: Sequence[str] = ()
) -> list[tuple[str, DictConfig]]:
    """Writes one config per job into ``rows_dir/experiment/`` and composes each.

    Args:
        table: The table.
        rows: Its rows to write.
        rows_dir: The folder that joins Hydra's search path.
        smoke: Write the smoke versions (see the module docstring).
        extra: Overrides every job is composed with (not written).

    Returns:
        ``(job id, composed config)`` per job (the row ids, ``<row id>__split<k>`` for the
        repeats of a row with splits), in row order.

    Raises:
        hydra.errors.HydraException: a row does not compose (before anything runs).
    """
    folder, search = rows_dir / "experiment", searchpath_override(rows_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if smoke:
        (rows_dir / "reproduce").mkdir(exist_ok=True)
        reset = "# @package _global_\nbackbone: null\ndataset: null\n"
        (rows_dir / f"{RESET_CONFIG}.yaml").write_text(reset)
    jobs = []
    for row in rows:
        real = _compose(row.overrides) if smoke else None
        for job, split in row_jobs(row, smoke):
            nodes = smoke_nodes(real, split) if real is not None else None
            (folder / f"{job}.yaml").write_text(row_config(row, table, split, nodes))
            jobs.append((job, _compose([f"experiment={job}", search, *extra])))
    return jobs


def missing_inputs(jobs: Sequence[tuple[str, DictConfig]]) -> list[str]:
    """The dataset folders and weights files the jobs need and this machine lacks.

    Each missing thing is listed once, with the jobs that need it. ImageNet weights that
    a backbone downloads on first use (``pretrained: true``) are not checked.

    Args:
        jobs: ``(job id, composed config)`` pairs.
    """
    needs: dict[str, list[str]] = {}
    datasets: dict[str, str | None] = {}
    for job, cfg in jobs:
        b = cfg.backbone
        nodes = [b, *(b[k] for k in ("stream_a", "stream_b") if k in b)]  # two streams
        files = [str(n.weights) for n in nodes if n.get("weights")]  # resolved
        problems = [f"weights file {w}" for w in files if not Path(w).is_file()]
        node = OmegaConf.to_yaml(cfg.dataset, resolve=True)
        if node not in datasets:
            try:
                instantiate(cfg.dataset, split="test", augment=False)
                datasets[node] = None
            except FileNotFoundError as err:
                datasets[node] = str(err).splitlines()[0].rstrip(".")
        if missing := datasets[node]:
            problems.append(missing)
        for problem in problems:
            needs.setdefault(problem, []).append(job)
    return [f"{p}: needed by {_some(ids)}" for p, ids in needs.items()]


def _some(ids: list[str], most: int = 4) -> str:
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return ", ".join(ids[:most]) + more


def multirun_command(
    names: Sequence[str],
    rows_dir: Path,
    sweep_dir: Path,
    launcher: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``python -m bcnn.train --multirun ...`` command that runs the generated rows."""
    cmd = [sys.executable, "-m", "bcnn.train", "--multirun", f"experiment={','.join(names)}"]
    cmd += [searchpath_override(rows_dir), f"hydra.sweep.dir={_quote(str(sweep_dir.resolve()))}"]
    cmd += ["hydra.sweep.subdir=${hydra.runtime.choices.experiment}"]
    return cmd + ([f"hydra/launcher={launcher}"] if launcher else []) + list(extra)


def launch_table(
    table: Table,
    sweep_dir: Path,
    smoke: bool = False,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    patterns: Sequence[str] = (),
    dry_run: bool = False,
) -> int:
    """Writes the rows of ``table`` and runs them as one Hydra multirun.

    Args:
        table: The table spec.
        sweep_dir: Where the jobs write (``<sweep_dir>/<row id>/``).
        smoke: Smoke mode (synthetic data, small CNN, CPU).
        launcher: A ``hydra/launcher`` option (``joblib``, ``submitit_slurm``, ``slurm``...).
        extra: Further overrides for every job (``trainer.device=cuda:1``, ``hydra.launcher.
            partition=gpu``, ...).
        patterns: Only the rows whose id matches one of these fnmatch patterns.
        dry_run: Write the configs and print the command (and what is missing) without
            running it.

    Rows that cannot run (``Row.reason``) and timing rows (``Row.benchmark``) are listed in
    ``reproduce.json`` but launch no job.

    Returns:
        The exit status of the multirun (0 when every job succeeded).

    Raises:
        FileNotFoundError: a dataset folder or weights file that a job needs is missing
            (all of them listed once; not in smoke mode, printed only with ``dry_run``).
    """
    selected = select_rows(table, patterns)
    runnable = [r for r in selected if r.runnable]
    rows_dir = sweep_dir / ROWS_DIR
    own = [o for o in extra if not o.lstrip("+~").startswith("hydra")]  # the jobs' settings
    jobs = write_rows(table, runnable, rows_dir, smoke, own)
    names = [job for job, _ in jobs]
    if missing := [] if smoke else missing_inputs(jobs):
        message = f"{table.name}: {len(missing)} input(s) missing, nothing was launched:\n"
        message += "\n".join(f"- {m}" for m in missing)
        message += (
            "\nDatasets: docs/datasets.md (scripts/prepare_data.py); weights: docs/reproduce.md."
        )
        if not dry_run:
            raise FileNotFoundError(message)
        print(f"[reproduce] {message}", file=sys.stderr)
    cmd = multirun_command(names, rows_dir, sweep_dir, launcher, extra)
    rows = [{"id": r.id, **{k: v for k, v in asdict(r).items() if v}} for r in selected]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    manifest = {"table": table.name, "smoke": smoke, "started": started, "rows": rows}
    manifest["command"] = cmd
    (sweep_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print("[reproduce] " + " ".join(cmd), file=sys.stderr)
    if dry_run or not names:
        return 0
    return subprocess.run(cmd, check=False).returncode


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """``reproduce.json`` of a sweep directory, or None if there is none."""
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
