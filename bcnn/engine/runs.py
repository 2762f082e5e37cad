"""A run's directory: claimed by one run, identified, and read back as a trained model.

A fresh run claims its directory by creating ``run_id.txt`` exclusively (of two runs
started at once, one gets it); every checkpoint carries the id, so a resume refuses
another run's. Commands that use a trained model start at :func:`load_trained`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from bcnn.config import schema
from bcnn.engine import distributed as D
from bcnn.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resumable,
    resolve_checkpoint,
)
from bcnn.models import BilinearModel, build_model
from bcnn.models.inputs import InputSpec

# Files that mean a directory holds a run: first the claim (the run's id), last its work
# (without which a failed fresh run gives the directory back).
RUN_FILES = ("run_id.txt", "config.yaml", "metrics.csv", "results.json", "checkpoints")
# Directories claimed by this process's Hydra callback, awaiting their run: path -> run id.
_CLAIMED: dict[Path, str] = {}
# Command-line keys that win over a resumed run's config (where and how fast, not what).
RUNTIME_KEYS = ("device", "num_workers", "progress")

log = logging.getLogger(__name__)


class RunDirectoryError(FileExistsError):
    """A fresh run was pointed at a directory that holds another run."""


def _claim(output_dir: Path) -> str:
    """Claims ``output_dir`` for a fresh run and returns its new id, or raises
    ``RunDirectoryError`` when the directory holds another run."""
    with contextlib.suppress(FileExistsError):  # another run created run_id.txt first
        if not any((output_dir / name).exists() for name in RUN_FILES):
            with (output_dir / RUN_FILES[0]).open("x") as f:
                f.write(run_id := secrets.token_hex(8))
            return run_id
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    raise RunDirectoryError(
        f"{output_dir} already holds a run ({', '.join(found)}): resume it with "
        f"trainer.resume={output_dir}, or choose another directory (hydra.run.dir=<new "
        "folder>, or paths.output_dir=<new folder> when calling bcnn.engine.train)."
    )


def release_run_dir(output_dir: Path | None) -> None:
    """Gives back the directory of a fresh run that failed before any work (its claim and
    config are removed); ``None``: those this process's Hydra callback claimed."""
    for folder in [output_dir] if output_dir is not None else list(_CLAIMED):
        _CLAIMED.pop(folder.resolve(), None)
        if not any((folder / name).exists() for name in RUN_FILES[2:]):
            for name in RUN_FILES[:2]:
                (folder / name).unlink(missing_ok=True)


def resume(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any], Path]:
    """The config (the run's own, with the command line's ``RUNTIME_KEYS``), checkpoint and
    checkpoint file of the run ``trainer.resume`` names.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: no usable one.
    """
    path, ckpt = load_resumable(resolve_checkpoint(cfg.trainer.resume))
    saved = _saved_config(ckpt["config"])
    with open_dict(saved):
        for key in RUNTIME_KEYS:
            saved.trainer[key] = cfg.trainer[key]
        saved.trainer.resume = str(path)
        saved.paths.output_dir = str(path.parent.parent)
    log.info("Resuming from %s with the config it was started with", path)
    return saved, ckpt, path


def _saved_config(config: Any) -> DictConfig:
    """A saved config, typed like a composed one."""
    merged = OmegaConf.merge(schema(), config)
    assert isinstance(merged, DictConfig)
    return merged


def open_run(
    output_dir: Path, ckpt: Mapping[str, Any] | None, path: Path | None, env: D.DistEnv
) -> str:
    """The run's id, on every process: rank 0 claims the directory of a fresh run (or takes
    its Hydra callback's claim), or checks that a resumed checkpoint belongs to it.

    Raises:
        RunDirectoryError: the directory holds another run.
        CheckpointError: the checkpoint belongs to another run.
    """
    outcome: str | Exception | None = None
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            if ckpt is None or path is None:
                outcome = _CLAIMED.pop(output_dir.resolve(), None) or _claim(output_dir)
            else:
                outcome = resumed_run_id(output_dir, ckpt, path)
        except (RunDirectoryError, CheckpointError) as err:
            outcome = err
    outcome = D.broadcast_object(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return str(outcome)


def resumed_run_id(output_dir: Path, ckpt: Mapping[str, Any], path: Path) -> str:
    """The id of the run ``ckpt`` resumes, which must be that of ``output_dir`` (else a
    ``CheckpointError`` names both runs); a checkpoint or directory from before runs had ids
    passes (the directory gets one)."""
    file = output_dir / RUN_FILES[0]
    mine = file.read_text().strip() if file.is_file() else None
    theirs = ckpt.get("run_id")
    if mine and theirs and mine != theirs:
        raise CheckpointError(
            f"{path} was written by run {theirs} (in {ckpt.get('run_dir', 'another directory')})"
            f", not by run {mine} of {output_dir}: a checkpoint only resumes the run that "
            "wrote it. Resume that run with its own directory, or start a fresh run."
        )
    if mine is None:
        file.write_text(mine := theirs or secrets.token_hex(8))
    return mine


@contextlib.contextmanager
def file_log(output_dir: Path, enabled: bool) -> Iterator[None]:
    """Adds the run's ``train.log`` for the block, when Hydra does not already write it."""
    if not enabled or HydraConfig.initialized():
        yield
        return
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("bcnn")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def settle_run_dir(config: DictConfig) -> tuple[str, bool]:
    """``(directory, resumed)``: the run directory of a composed config with its ``hydra``
    node, chosen before Hydra writes there (by rank 0 of a run).

    A resumed run (``trainer.resume``) runs in its own directory (where Hydra must not
    write a second record); a fresh one claims ``hydra.run.dir`` now, so that a refused run
    writes nothing there; one given ``paths.output_dir`` claims that later.

    Raises:
        RunDirectoryError: the directory holds another run.
    """
    resume = config.trainer.get("resume")
    if resume:
        with contextlib.suppress(FileNotFoundError):  # else the trainer reports it
            return str(resolve_checkpoint(resume).parent.parent), True
    run_dir = Path(str(config.hydra.run.dir)).resolve()
    if not resume and not config.paths.get("output_dir"):
        run_dir.mkdir(parents=True, exist_ok=True)
        _CLAIMED[run_dir] = _claim(run_dir)
    return str(run_dir), False


@dataclass
class TrainedModel:
    """A model in eval mode (uint8 or [0, 1] images in, logits out) with its run's resolved
    config, its class names (``classes[i]`` names logit i), its checkpoint file and its run
    directory (the checkpoint's grandparent)."""

    model: BilinearModel
    config: DictConfig
    classes: list[str]
    checkpoint: Path
    run_dir: Path


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuilds a trained model from a ``.pt`` checkpoint or a run directory: its selected
    epoch (``checkpoints/best.pt``; without a validation split, the last), else
    ``checkpoints/last.pt``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the checkpoint does not hold a bcnn model.
    """
    path = Path(path).expanduser()
    found = [path / "checkpoints" / name for name in ("best.pt", "last.pt")]
    file = next((f for f in [path, *found] if f.is_file()), None)
    if file is None:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint file nor a run directory with checkpoints/best.pt "
            "or checkpoints/last.pt. Pass the folder a training run wrote "
            "(outputs/<date>/<time>) or one of its .pt files."
        )
    ckpt = load_checkpoint(file)
    if "config" not in ckpt:
        raise ValueError(f"{file} is not a bcnn training checkpoint (no model and config)")
    weights = ckpt["model"]
    classes = ckpt.get("classes")
    if classes is None:  # checkpoints written before class names were stored
        num_classes = next(v.shape[0] for k, v in weights.items() if k.endswith("bias"))
        classes = [str(i) for i in range(num_classes)]
    config, model = rebuild_model(ckpt["config"], len(classes), ckpt.get("input_spec"))
    model.load_state_dict(weights)
    model.to(device).eval()
    return TrainedModel(model, config, list(classes), file, file.parent.parent)


def rebuild_model(
    config: Any, num_classes: int, input_spec: Mapping[str, Any] | None
) -> tuple[DictConfig, BilinearModel]:
    """A saved ``config`` merged onto the schema, and its model for saved weights to fill (no
    download, no weights file); ``input_spec`` (``InputSpec``'s fields) restores the input
    convention a weights file brought (MatConvNet's)."""
    merged = _saved_config(config)
    with without_weight_sources(merged):
        model = build_model(merged, num_classes)
    if input_spec:
        mean, std = tuple(input_spec["mean"]), tuple(input_spec["std"])
        model.set_input_spec(InputSpec(mean, std, input_spec["color"], input_spec["scale"]))
    return merged, model


@contextlib.contextmanager
def without_weight_sources(config: DictConfig) -> Iterator[None]:
    """For the block, sets every ``pretrained`` of the backbone config to false, and every
    ``weights`` whose file is gone to null."""
    saved: list[tuple[DictConfig, str, Any]] = []

    def visit(node: Any) -> None:
        if isinstance(node, DictConfig):
            for key in list(node.keys()):
                if key == "pretrained" or (
                    key == "weights" and node[key] and not Path(node[key]).expanduser().is_file()
                ):
                    saved.append((node, str(key), node[key]))
                    node[key] = False if key == "pretrained" else None
                else:
                    visit(node[key])

    visit(config.backbone)
    try:
        yield
    finally:
        for node, key, value in saved:
            node[key] = value
