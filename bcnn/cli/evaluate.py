"""``bcnn-eval checkpoint=<run dir or .pt> [split=test] [dataset=...]``: top-1, per-class
accuracy and confusions of a trained model (``configs/eval.yaml``; the files it writes are
listed in docs/deploy.md). The model is scored by the training loop's own
``bcnn.engine.loops.evaluate``, with the flips and precision the run evaluated with.
"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path
from typing import Annotated, Any

import hydra
import numpy as np
import pandas as pd
from annotated_types import Ge
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from bcnn.cli.overrides import check_overrides
from bcnn.config import TrainerConfig, instantiate
from bcnn.data.base import Split
from bcnn.engine.loops import evaluate
from bcnn.engine.placement import resolve_device
from bcnn.engine.runs import TrainedModel, load_trained
from bcnn.errors import user_errors
from bcnn.limits import check_value
from bcnn.viz.report import confused_pairs, confusion_figure

log = logging.getLogger(__name__)
PROG = "bcnn-eval"


def overridden(key: str) -> bool:
    """Whether the command line of the running Hydra job sets ``key``."""
    if not HydraConfig.initialized():
        return False
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in HydraConfig.get().overrides.task)


def dataset_config(cfg: DictConfig, trained: TrainedModel, move_data_dir: bool) -> DictConfig:
    """The dataset to evaluate on: ``cfg.dataset`` when selected, else the run's own.

    Args:
        cfg: The eval config.
        trained: The model and its run's config.
        move_data_dir: ``paths.data_dir`` was given: the run's config holds resolved paths,
            so a dataset root below the run's data folder is moved below the new one.
    """
    if cfg.get("dataset") is not None:
        return cfg.dataset
    node = trained.config.dataset.copy()
    old_dir, new_dir = str(trained.config.paths.data_dir), str(cfg.paths.data_dir)
    root = node.get("root")
    if root and move_data_dir and old_dir != new_dir:
        old, new = Path(old_dir), Path(new_dir)
        if Path(root).is_relative_to(old):
            with open_dict(node):
                node.root = str(new / Path(root).relative_to(old))
        else:
            log.warning(
                "paths.data_dir=%s not applied: the run's dataset root %s is not below its "
                "data folder %s; select the dataset with dataset=<name> dataset.root=<folder>",
                new_dir, root, old_dir,
            )  # fmt: skip
    return node


def _check(cfg: DictConfig) -> None:
    """Checks eval.yaml's own keys, before the checkpoint is read; those that are also the
    trainer's take its limits."""
    if cfg.precision is not None:  # precision=32 on the command line is an integer
        cfg.precision = str(cfg.precision)
    trainer = typing.get_type_hints(TrainerConfig, include_extras=True)
    limits: dict[str, Any] = {
        "split": Split,
        "device": trainer["device"],
        "precision": trainer["precision"] | None,
        "batch_size": trainer["eval_batch_size"],
        "limit_batches": trainer["limit_eval_batches"],
        "num_workers": trainer["num_workers"],
        "flip": trainer["test_flip"] | None,
        "progress": trainer["progress"],
        "top_confused": Annotated[int, Ge(0)],
    }
    for key, ann in limits.items():
        check_value(cfg[key], ann, key)


def per_class_table(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per class of the ``(C, C)`` counts ``matrix`` (rows = true class): images, correct,
    accuracy (%) and the most frequent wrong prediction."""
    totals, correct = matrix.sum(1), np.diag(matrix)
    off = matrix - np.diag(correct)
    worst = off.argmax(1)
    return pd.DataFrame(
        {
            "index": np.arange(len(classes)),
            "class": classes,
            "images": totals,
            "correct": correct,
            "accuracy": np.where(totals > 0, 100.0 * correct / np.maximum(totals, 1), np.nan),
            "most_confused_with": [
                classes[w] if off[i, w] > 0 else "" for i, w in enumerate(worst)
            ],
            "confused_count": off[np.arange(len(classes)), worst],
        }
    )


def most_confused(matrix: np.ndarray, classes: list[str], top: int) -> pd.DataFrame:
    """The ``top`` most frequent (true, predicted) pairs with true != predicted."""
    rows = [
        (classes[t], classes[p], n, 100.0 * n / max(int(matrix[t].sum()), 1))
        for t, p, n in confused_pairs(matrix, top)
    ]
    return pd.DataFrame(rows, columns=["true", "predicted", "count", "share_of_true_class"])


def _split_dataset(
    cfg: DictConfig, trained: TrainedModel, move_data_dir: bool
) -> tuple[DictConfig, Any, list[str]]:
    """The dataset config, the split to evaluate on (a map-style dataset with a length) and
    the split's class names.

    Raises:
        ValueError: the split is empty, or its classes are not the model's.
    """
    ds_cfg = dataset_config(cfg, trained, move_data_dir)
    dataset = instantiate(ds_cfg, split=cfg.split, augment=False)
    if len(dataset) == 0:
        hint = " (the run trained without a validation split: dataset.val_fraction=0)"
        raise ValueError(
            f"split {cfg.split!r} of {ds_cfg.get('name', 'the dataset')} is empty"
            + (hint if cfg.split == "val" else "")
        )
    classes = list(getattr(dataset, "classes", trained.classes))
    if classes != trained.classes:
        differ = [(a, b) for a, b in zip(classes, trained.classes) if a != b][:1]
        first = "".join(f" (the dataset's {a!r} where the model has {b!r})" for a, b in differ)
        raise ValueError(
            f"The dataset's {len(classes)} classes are not the model's {len(trained.classes)}"
            f"{first}: evaluate on the dataset the model was trained on, with the same class list"
        )
    return ds_cfg, dataset, classes


def run_eval(cfg: DictConfig, output_dir: Path, move_data_dir: bool = False) -> dict[str, Any]:
    """Evaluates ``cfg.checkpoint`` on ``cfg.split`` and writes the files into ``output_dir``.

    Args:
        cfg: The composed ``configs/eval.yaml``.
        output_dir: Where the files go (created).
        move_data_dir: See ``dataset_config``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        FileNotFoundError: no checkpoint, or a missing dataset.
        ValueError: an invalid option, an empty split, or a dataset whose classes are not
            the model's.
    """
    _check(cfg)
    device = resolve_device(str(cfg.device))
    trained = load_trained(cfg.checkpoint, device=device)
    ds_cfg, dataset, classes = _split_dataset(cfg, trained, move_data_dir)
    # Flips, precision and batch size: the command line's, else as the run evaluated.
    run = trained.config.trainer
    flip = bool(run.test_flip if cfg.flip is None else cfg.flip)
    precision = str(run.precision if cfg.precision is None else cfg.precision)
    batch_size = int(cfg.batch_size or run.eval_batch_size or run[run.stages[-1]].batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=int(cfg.num_workers),
        pin_memory=device.type == "cuda",
    )
    log.info(
        "Evaluating %s on %s/%s (%d images), flip=%s, precision=%s, device %s",
        trained.checkpoint, ds_cfg.get("name"), cfg.split, len(dataset), flip, precision, device,
    )  # fmt: skip
    meter = evaluate(
        trained.model,
        loader,
        len(trained.classes),
        device,
        precision=precision,
        flip=flip,
        max_batches=cfg.limit_batches,
        desc=f"eval {cfg.split}" if cfg.progress else None,
    )
    top1, mean_class = meter.accuracy(), meter.mean_class_accuracy()
    name = ds_cfg.get("name", "dataset")
    matrix = meter.matrix.cpu().numpy()
    output_dir.mkdir(parents=True, exist_ok=True)
    per_class = per_class_table(matrix, classes)
    per_class.to_csv(output_dir / "per_class.csv", index=False, float_format="%.4f")
    pd.DataFrame(matrix, index=classes, columns=classes).to_csv(output_dir / "confusion_matrix.csv")
    confused = most_confused(matrix, classes, int(cfg.top_confused))
    confused.to_csv(output_dir / "most_confused.csv", index=False, float_format="%.4f")
    fig = confusion_figure(matrix, classes)
    fig.suptitle(
        f"{name} {cfg.split}: top-1 {top1:.2f}%, mean per class {mean_class:.2f}%", fontsize=9
    )
    fig.savefig(output_dir / "confusion_matrix.png", dpi=120)
    metrics = {
        "top1": top1,
        "mean_class_acc": mean_class,
        "images": meter.count,
        "split": cfg.split,
        "dataset": name,
        "num_classes": len(classes),
        "flip": flip,
        "precision": precision,
        "checkpoint": str(trained.checkpoint),
        "most_confused": confused.to_dict(orient="records"),
        "output_dir": str(output_dir),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    """The text printed at the end of an evaluation."""
    lines = [
        f"{metrics['dataset']} {metrics['split']}: {metrics['images']} images, "
        f"top-1 {metrics['top1']:.2f}%, mean per-class accuracy {metrics['mean_class_acc']:.2f}%",
    ]
    confused = pd.DataFrame(metrics["most_confused"])
    if len(confused):
        confused["share_of_true_class"] = confused["share_of_true_class"].map("{:.1f}%".format)
        lines += ["most confused pairs:", confused.to_string(index=False)]
    out = Path(metrics["output_dir"])
    lines.append(
        f"written to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}"
    )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://bcnn.configs", config_name="eval")
def _hydra_main(cfg: DictConfig) -> float:
    with user_errors(PROG):
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        metrics = run_eval(cfg, output_dir, move_data_dir=overridden("paths.data_dir"))
        print(summary(metrics))
        return float(metrics["top1"])


def main() -> None:
    """``bcnn-eval``: evaluates a trained model."""
    check_overrides(PROG, "eval")
    _hydra_main()


if __name__ == "__main__":
    main()
