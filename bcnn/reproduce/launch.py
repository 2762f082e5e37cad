"""Launch a table: one Hydra multirun of ``train.py`` with one job per row (docs/reproduce.md).

A table is not a cartesian product (``CUB+box`` exists only for CUB), so each job becomes a
generated ``experiment`` config in ``<sweep_dir>/.rows/`` and the multirun sweeps over those.
Smoke mode keeps each row's head, stages and recipe but swaps in the small CNN, the
``debug=smoke`` epochs on CPU and a synthetic stand-in per dataset. Its backbone and dataset
nodes are first reset to null (``reproduce/smoke_reset``): a preset's keys for the real ones
(``pretrained``, ``partition``) would otherwise be merged into the small ones.
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

# Smoke sizes. Compact pooling's sketch shrinks to SMOKE_SKETCH_DIM: 8192 dimensions per
# location made a smoke job take a minute. The row keeps its gradient accumulation (a step
# per micro-batch of 8 at the recipe's rate collapsed fine-tuned classifiers onto a few
# classes); debug=smoke's epochs run whole.
SMOKE_DATASET: dict[str, Any] = {"trainval_size": 384, "test_size": 512, "image_size": 16}
SMOKE_CHANNELS = [8]
SMOKE_SPLITS = 2  # repeats run per row with splits
SMOKE_SKETCH_DIM = 512
SMOKE_TRAINER: dict[str, Any] = {"device": "cpu", "precision": "32", "num_workers": 0}
SMOKE_TRAINER |= {"eval_batch_size": 256, "limit_train_batches": None, "limit_eval_batches": None}


def compose_train(overrides: Sequence[str], hydra: bool = False) -> DictConfig:
    """``train.py``'s config composed with ``overrides`` (``hydra``: with the hydra node)."""
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def split_overrides(overrides: Iterable[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Splits Hydra overrides into group choices (``{"dataset": "cub"}``) and a nested dict
    of values (``{"trainer": {"stages": [...]}}``). A ValueError rejects a sweep, deletion,
    addition or list index, which a config file cannot express."""
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


def smoke_nodes(real: DictConfig, split: int | None) -> dict[str, Any]:
    """The nodes smoke mode puts into a row's config, from the row's composed ``real`` one.

    The small CNN (two for a two-stream backbone); the synthetic set at smoke sizes with
    the row's validation fraction and a seed and class count (4 to 6) derived from the
    dataset's name, so that each dataset column is a run of its own (a split moves the
    seed); the sketch at ``SMOKE_SKETCH_DIM``; a PCA projection at most the small CNN's
    channels (PCA has no more directions).
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
    """The YAML text of a row's generated experiment config: the job of ``row.splits[split]``
    (None: no repeats), the full run or the smoke version (``smoke``: :func:`smoke_nodes`)."""
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


def write_rows(
    table: Table, rows: Sequence[Row], rows_dir: Path, smoke: bool, extra: Sequence[str] = ()
) -> list[tuple[str, DictConfig]]:
    """Writes one config per job of ``rows`` into ``rows_dir/experiment/`` (the folder that
    joins Hydra's search path; ``smoke``: the smoke versions, ``SMOKE_SPLITS`` repeats of a
    row with splits) and composes each with ``extra``: ``(job id, config)`` in row order.
    A row that does not compose raises Hydra's error before anything runs."""
    folder, search = rows_dir / "experiment", searchpath_override(rows_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if smoke:
        (rows_dir / "reproduce").mkdir(exist_ok=True)
        reset = "# @package _global_\nbackbone: null\ndataset: null\n"
        (rows_dir / f"{RESET_CONFIG}.yaml").write_text(reset)
    jobs = []
    for row in rows:
        real = compose_train(row.overrides) if smoke else None
        for k, job in enumerate(row.job_ids[:SMOKE_SPLITS] if smoke else row.job_ids):
            split = k if row.splits else None
            nodes = smoke_nodes(real, split) if real is not None else None
            (folder / f"{job}.yaml").write_text(row_config(row, table, split, nodes))
            jobs.append((job, compose_train([f"experiment={job}", search, *extra])))
    return jobs


def missing_inputs(jobs: Sequence[tuple[str, DictConfig]]) -> list[str]:
    """The dataset folders and weights files the ``(job id, config)`` pairs need and this
    machine lacks, each once with the jobs that need it. ImageNet weights that a backbone
    downloads on first use are not checked."""
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
    lines = []
    for problem, ids in needs.items():
        more = f" and {len(ids) - 4} more" if len(ids) > 4 else ""
        lines.append(f"{problem}: needed by {', '.join(ids[:4])}{more}")
    return lines


def launch_table(
    table: Table,
    sweep_dir: Path,
    smoke: bool = False,
    launcher: str | None = None,
    extra: Sequence[str] = (),
    patterns: Sequence[str] = (),
    dry_run: bool = False,
) -> int:
    """Writes the rows of ``table`` and runs them as one Hydra multirun; returns its exit
    status. Rows that cannot run and timing rows are listed in ``reproduce.json`` only.

    Args:
        table: The table spec.
        sweep_dir: Where the jobs write (``<sweep_dir>/<row id>/``).
        smoke: Smoke mode (synthetic data, small CNN, CPU).
        launcher: A ``hydra/launcher`` option (``joblib``, ``submitit_slurm``, ``slurm``...).
        extra: Further overrides for every job (``trainer.device=cuda:1``, ...).
        patterns: Only the rows whose id matches one of these fnmatch patterns.
        dry_run: Write the configs and print the command (and what is missing) only.

    Raises:
        ValueError: no row matches ``patterns``.
        FileNotFoundError: dataset folders or weights files that jobs need are missing
            (listed once; not in smoke mode; printed only with ``dry_run``).
    """
    selected = [r for r in table.rows if any(fnmatch.fnmatch(r.id, p) for p in patterns)]
    if patterns and not selected:
        raise ValueError(f"no row of {table.name} matches {list(patterns)}")
    selected = selected or list(table.rows)
    rows_dir = sweep_dir / ROWS_DIR
    own = [o for o in extra if not o.lstrip("+~").startswith("hydra")]  # the jobs' settings
    jobs = write_rows(table, [r for r in selected if r.runnable], rows_dir, smoke, own)
    if missing := [] if smoke else missing_inputs(jobs):
        message = f"{table.name}: {len(missing)} input(s) missing, nothing was launched:\n"
        message += "\n".join(f"- {m}" for m in missing)
        message += (
            "\nDatasets: docs/datasets.md (scripts/prepare_data.py); weights: docs/reproduce.md."
        )
        if not dry_run:
            raise FileNotFoundError(message)
        print(f"[reproduce] {message}", file=sys.stderr)
    names = [job for job, _ in jobs]
    cmd = [sys.executable, "-m", "bcnn.train", "--multirun", f"experiment={','.join(names)}"]
    cmd += [searchpath_override(rows_dir), f"hydra.sweep.dir={_quote(str(sweep_dir.resolve()))}"]
    cmd += ["hydra.sweep.subdir=${hydra.runtime.choices.experiment}"]
    cmd += ([f"hydra/launcher={launcher}"] if launcher else []) + list(extra)
    rows = [{"id": r.id, **{k: v for k, v in asdict(r).items() if v}} for r in selected]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    manifest = {"table": table.name, "smoke": smoke, "started": started, "rows": rows}
    (sweep_dir / MANIFEST).write_text(json.dumps({**manifest, "command": cmd}, indent=2))
    print("[reproduce] " + " ".join(cmd), file=sys.stderr)
    if dry_run or not names:
        return 0
    return subprocess.run(cmd, check=False).returncode
