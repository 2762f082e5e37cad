"""Launch a table: one Hydra multirun of ``train.py`` with exactly one job per row.

Hydra's basic sweeper takes the cartesian product of its sweeps, but the rows of a table
are not a product (``CUB+box`` exists only for CUB, the ECCV 2018 gamma differs per
dataset). So every row becomes a small generated config of the ``experiment`` group: it
includes the row's own ``experiment=`` preset and sets the row's other overrides. The
generated files live in ``<sweep_dir>/.rows/``, which joins Hydra's search path, and the
multirun sweeps over them::

    python -m bcnn.train --multirun experiment=<row id>,<row id>,... \\
        hydra.searchpath=[file://<sweep_dir>/.rows] hydra.sweep.dir=<sweep_dir> \\
        hydra.sweep.subdir=${hydra.runtime.choices.experiment} [hydra/launcher=...] [extra]

Each job's directory is named by its row id (a row with repeats, ``Row.splits``, e.g. the
ten DTD partitions: one job per split, ``<row id>__split<k>``). ``reproduce.json`` in the
sweep directory records the table, the rows and the command.

Smoke mode keeps every row's pooling, normalization, classifier, stages, recipe
(optimizers, learning rates, schedules) and data protocol (trainval or a held-out
validation split) but swaps the data for the built-in synthetic dataset, the backbone for
the small CNN (two small CNNs for two-stream rows, so that x_a x_b^T pooling still runs)
and the budget for the ``debug=smoke`` preset's: its epochs and batch sizes, on CPU. It
runs those epochs whole on a 384-image synthetic training set and tests 512 images (the
preset alone caps an epoch at three batches, which leaves every classifier at its zero
initialization and every row of a table at one score): a few seconds per row on 2 CPU
cores, and rows that differ in pooling or normalization score differently. Backbone and
dataset nodes are first reset to null (``reproduce/smoke_reset.yaml``) because a preset's
keys for the real backbone (``pretrained``, ``weights``) or dataset (``partition``) would
otherwise be merged into the small ones. Compact pooling sketches to ``SMOKE_SKETCH_DIM``
dimensions instead of the row's, and a PCA-initialized projection keeps at most the small
CNN's channels. A row with repeats runs its first
``SMOKE_SPLITS`` splits, each on the synthetic dataset generated from another seed (the
split's own override names a real dataset's key), so that their mean and standard
deviation are computed from different runs.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

import bcnn.config  # noqa: F401  (registers the schema that configs/train.yaml names)
from bcnn.reproduce.tables import Row, Table

ROWS_DIR = ".rows"
MANIFEST = "reproduce.json"
RESET_CONFIG = "reproduce/smoke_reset"

# Smoke settings: small synthetic data, a one-block CNN, the debug=smoke training budget.
# The validation fraction is the row's own (0: train on trainval, keep the last epoch).
SMOKE_DATASET: dict[str, Any] = {
    "num_classes": 4,
    "trainval_size": 384,
    "test_size": 512,
    "image_size": 16,
}
SMOKE_CHANNELS = [8]
# Splits run per row with repeats in smoke mode (split k: synthetic data of seed k).
SMOKE_SPLITS = 2
# Sketch dimension of compact pooling in smoke mode: the small CNN's 8 channels have a
# 64-entry outer product, and an 8192-dimensional sketch of every location made a smoke
# job take a minute on 2 CPU cores.
SMOKE_SKETCH_DIM = 512
# The epochs and batch sizes are the debug=smoke preset's (configs/debug/smoke.yaml);
# these run its epochs whole and make a row's own settings CPU-friendly. The row keeps its
# gradient accumulation: a step then averages the gradients of batch_size x grad_accum
# images, as the recipe's steps do (one step per micro-batch of 8 at the recipe's
# learning rate collapsed fine-tuned classifiers onto the same few classes).
SMOKE_TRAINER: dict[str, Any] = {
    "device": "cpu",
    "precision": "32",
    "num_workers": 0,
    "limit_train_batches": None,
    "limit_eval_batches": None,
    "eval_batch_size": 256,
}
TWO_STREAM_TARGET = "bcnn.models.backbones.TwoStream"


def config_groups() -> frozenset[str]:
    """The config groups of ``bcnn.configs`` (folders such as ``dataset``, ``backbone``)."""
    root = resources.files("bcnn.configs")
    return frozenset(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def split_overrides(overrides: Iterable[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Splits a row's overrides into group choices and a nested dict of key values.

    Args:
        overrides: Hydra overrides: ``group=option`` or ``a.b.c=value``.

    Returns:
        ``(choices, body)``: ``{"dataset": "cub", ...}`` and e.g.
        ``{"trainer": {"stages": ["linear"]}}``.

    Raises:
        ValueError: a sweep, deletion, addition or list-index override, which a config
            file cannot express.
    """
    parser = OverridesParser.create()
    groups = config_groups()
    choices: dict[str, str] = {}
    body: dict[str, Any] = {}
    for text in overrides:
        o = parser.parse_override(text)
        key = o.key_or_group
        if o.is_sweep_override() or o.is_delete() or o.is_add() or o.package:
            raise ValueError(f"row override {text!r}: use plain group=option or key=value")
        if key in groups:
            choices[key] = str(o.value())
            continue
        parts = key.split(".")
        if any(p.isdigit() for p in parts):
            raise ValueError(
                f"row override {text!r} indexes a list, which a config file cannot merge: "
                "put the whole list in an experiment file"
            )
        node = body
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = o.value()
    return choices, body


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _group_node(group: str, option: str) -> dict[str, Any]:
    path = resources.files("bcnn.configs").joinpath(group, f"{option}.yaml")
    with path.open() as f:
        node = OmegaConf.to_container(OmegaConf.load(f))
    assert isinstance(node, dict)
    return node


def smoke_backbone(two_stream: bool) -> dict[str, Any]:
    """The small CNN's config node, or a two-stream pair of them."""
    small = _group_node("backbone", "small")
    small["channels"] = list(SMOKE_CHANNELS)
    if not two_stream:
        return small
    return {"_target_": TWO_STREAM_TARGET, "stream_a": small, "stream_b": dict(small)}


def smoke_dataset(val_fraction: float = 0.0) -> dict[str, Any]:
    """The synthetic dataset's config node at smoke sizes, with the row's val fraction."""
    return _merge(
        _group_node("dataset", "synthetic"), {**SMOKE_DATASET, "val_fraction": val_fraction}
    )


def smoke_pooling(pooling: Any) -> dict[str, Any]:
    """Keys of a row's pooling node replaced at smoke sizes (empty: none).

    Compact pooling's sketch shrinks to ``SMOKE_SKETCH_DIM``; a PCA-initialized
    projection keeps at most the small CNN's channels (PCA has no more directions).
    """
    patch: dict[str, Any] = {}
    if "sketch" in pooling:
        patch["sketch"] = {"out_dim": SMOKE_SKETCH_DIM}
    dim = pooling.get("proj_dim")
    if pooling.get("proj_init") == "pca" and dim and dim > SMOKE_CHANNELS[-1]:
        patch["proj_dim"] = SMOKE_CHANNELS[-1]
    return patch


def row_jobs(row: Row, smoke: bool = False) -> list[tuple[str, int | None]]:
    """The jobs of a row: ``(job id, split index or None)``; smoke runs ``SMOKE_SPLITS``."""
    if not row.splits:
        return [(row.id, None)]
    jobs = list(zip(row.job_ids, range(len(row.splits))))
    return jobs[:SMOKE_SPLITS] if smoke else jobs


def row_config(
    row: Row,
    table: Table,
    smoke: bool = False,
    two_stream: bool = False,
    val_fraction: float = 0.0,
    split: int | None = None,
    pooling: dict[str, Any] | None = None,
) -> str:
    """The YAML text of a row's generated experiment config.

    Args:
        row: The row.
        table: Its table (named in the header comment).
        smoke: Write the smoke version (see the module docstring).
        two_stream: Smoke only: the row's backbone gives two feature maps.
        val_fraction: Smoke only: the row's ``dataset.val_fraction``.
        split: Index into ``row.splits`` of the job's repeat (None: no repeats).
        pooling: Smoke only: keys of the row's pooling node replaced at smoke sizes
            (``smoke_pooling``).
    """
    overrides = list(row.overrides)
    if split is not None:
        overrides.append(row.splits[split])
    choices, body = split_overrides(overrides)
    experiment = choices.pop("experiment", None)
    if smoke:
        choices.update(backbone="small", dataset="synthetic")
        body.pop("backbone", None)
        body.pop("dataset", None)
        dataset = smoke_dataset(val_fraction)
        if split is not None:  # another synthetic dataset per split
            dataset["seed"] = split + 1
        smoke_body: dict[str, Any] = {
            "backbone": smoke_backbone(two_stream),
            "dataset": dataset,
            "trainer": SMOKE_TRAINER,
        }
        if pooling:
            smoke_body["pooling"] = pooling
        body = _merge(body, smoke_body)
    defaults: list[Any] = []
    if experiment:
        defaults.append(f"/experiment/{experiment}")
    if smoke:
        defaults += [f"/{RESET_CONFIG}", "/debug/smoke"]
    defaults.append("_self_")
    defaults += [{f"override /{g}": o} for g, o in choices.items()]
    kind = "SMOKE: synthetic data, small CNN" if smoke else "full run"
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


def write_rows(table: Table, rows: Sequence[Row], rows_dir: Path, smoke: bool) -> list[str]:
    """Writes one config per job into ``rows_dir/experiment/`` and checks each composes.

    Returns:
        The generated config names (the job ids: the row ids, ``<row id>__split<k>`` for
        the repeats of a row with splits), in row order.

    Raises:
        hydra.errors.HydraException: a row does not compose (before anything runs).
    """
    exp_dir = rows_dir / "experiment"
    exp_dir.mkdir(parents=True, exist_ok=True)
    if smoke:
        reset = rows_dir / f"{RESET_CONFIG}.yaml"
        reset.parent.mkdir(parents=True, exist_ok=True)
        reset.write_text("# @package _global_\nbackbone: null\ndataset: null\n")
    names = []
    search = searchpath_override(rows_dir)
    for row in rows:
        two_stream, val_fraction, pooling = False, 0.0, None
        if smoke:
            real = _compose(row.overrides)
            two_stream = real.backbone.get("_target_") == TWO_STREAM_TARGET
            val_fraction = float(real.dataset.get("val_fraction", 0.0) or 0.0)
            pooling = smoke_pooling(real.pooling)
        for job, split in row_jobs(row, smoke):
            text = row_config(row, table, smoke, two_stream, val_fraction, split, pooling)
            (exp_dir / f"{job}.yaml").write_text(text)
            _compose([f"experiment={job}", search])
            names.append(job)
    return names


def multirun_command(
    names: Sequence[str],
    rows_dir: Path,
    sweep_dir: Path,
    launcher: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``python -m bcnn.train --multirun ...`` command that runs the generated rows."""
    cmd = [
        sys.executable,
        "-m",
        "bcnn.train",
        "--multirun",
        f"experiment={','.join(names)}",
        searchpath_override(rows_dir),
        f"hydra.sweep.dir={_quote(str(sweep_dir.resolve()))}",
        "hydra.sweep.subdir=${hydra.runtime.choices.experiment}",
    ]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    return cmd + list(extra)


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
        dry_run: Write the configs and print the command without running it.

    Rows that cannot run (``Row.reason``) and timing rows (``Row.benchmark``) are listed in
    ``reproduce.json`` but launch no job.

    Returns:
        The exit status of the multirun (0 when every job succeeded).
    """
    selected = select_rows(table, patterns)
    runnable = [r for r in selected if r.runnable]
    rows_dir = sweep_dir / ROWS_DIR
    names = write_rows(table, runnable, rows_dir, smoke)
    cmd = multirun_command(names, rows_dir, sweep_dir, launcher, extra)
    manifest = {
        "table": table.name,
        "smoke": smoke,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [
            {
                "id": r.id,
                "label": r.label,
                "columns": list(r.columns),
                "overrides": list(r.overrides),
                **({"splits": list(r.splits)} if r.splits else {}),
                **({"reason": r.reason} if r.reason else {}),
                **({"benchmark": list(r.benchmark)} if r.benchmark else {}),
            }
            for r in selected
        ],
        "command": cmd,
    }
    (sweep_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print("[reproduce] " + " ".join(cmd), file=sys.stderr)
    if dry_run or not names:
        return 0
    return subprocess.run(cmd, check=False).returncode


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    """``reproduce.json`` of a sweep directory, or None if there is none."""
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
