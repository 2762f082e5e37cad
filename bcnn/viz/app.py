"""``visualize(cfg)``, the function behind ``bcnn-viz`` (``bcnn.cli.viz``,
``configs/viz.yaml``, docs/visualize.md): what a model learned, as pictures.

``bcnn-viz kind=<texture|inverse|maps|report> run=<training run dir> [viz.<kind>.<key>=...]``
writes into its own directory (Hydra's run directory, ``outputs/viz/<date>/<time>_<id>``,
or ``paths.output_dir``), never into the training run's.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

from bcnn.config import check_device, instantiate
from bcnn.engine.placement import output_dir, resolve_device
from bcnn.engine.runs import TrainedModel, load_trained
from bcnn.models.inputs import InputSpec
from bcnn.models.pooling import BilinearPool, DemocraticPool
from bcnn.viz.figures import (
    draw_image,
    figure,
    labelled_grid,
    load_image,
    loss_curve,
    save_figure,
    save_image,
)
from bcnn.viz.inverse import InverseResult, maximal_images
from bcnn.viz.layers import FeatureTaps
from bcnn.viz.maps import ImageMaps, compute_maps, draw_maps, spread
from bcnn.viz.report import build_report
from bcnn.viz.texture import TextureResult, synthesize_texture

log = logging.getLogger(__name__)

KINDS = ("texture", "inverse", "maps", "report")
MAP_KEYS = ("sum", "democratic", "alpha", "matrix", "class_map")  # ImageMaps' (n, h*w) maps


def load_runs(cfg: DictConfig, device: torch.device) -> list[TrainedModel]:
    """The trained model(s) named by ``run`` (a path or a list of paths); [] when unset."""
    run = cfg.get("run")
    if run is None or run == "":
        return []
    paths = list(run) if isinstance(run, (ListConfig, list, tuple)) else [run]
    runs = [load_trained(str(p), device=device) for p in paths]
    for other in runs[1:]:
        if other.classes != runs[0].classes:
            raise ValueError(
                f"run: {other.run_dir} and {runs[0].run_dir} were trained on different "
                "classes; several runs must share their classes (the same dataset)"
            )
    return runs


def _single_run(cfg: DictConfig, runs: list[TrainedModel]) -> TrainedModel:
    if not runs:
        raise ValueError(f"kind={cfg.kind} needs run=<training run directory or checkpoint>")
    if len(runs) > 1:
        raise ValueError(f"kind={cfg.kind} takes one run; got {len(runs)} (run=[...])")
    return runs[0]


def load_dataset(cfg: DictConfig, runs: Sequence[TrainedModel], split: str) -> Dataset | None:
    """One split of ``dataset`` (when selected), else of the run's dataset, else None."""
    node = cfg.get("dataset")
    if node is None and runs:
        node = runs[0].config.dataset
    if node is None:
        return None
    return instantiate(node, split=split, augment=False)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def _class_index(name: Any, classes: Sequence[str], key: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name < len(classes):
            raise ValueError(f"{key}: class index {name} is outside 0..{len(classes) - 1}")
        return name
    if str(name) in classes:
        return classes.index(str(name))
    raise ValueError(
        f"{key}: unknown class {name!r}; use indices or names such as {list(classes)[:5]}"
    )


def _first_of_class(dataset: Dataset, label: int) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    for i in range(len(dataset)):  # type: ignore[arg-type]
        if (targets[i] if targets is not None else dataset[i][1]) == label:
            return dataset[i][0]
    raise ValueError(f"viz.inverse.init=texture: the dataset split has no image of class {label}")


def _texture_network(
    cfg: DictConfig, runs: list[TrainedModel]
) -> tuple[torch.nn.Module, InputSpec, str]:
    """The network whose Gram matrices a texture matches: ``backbone=...``, else the run's.

    Returns:
        ``(backbone, its input convention, where it came from)``.
    """
    if cfg.get("backbone") is not None:
        backbone = instantiate(cfg.backbone)
        return backbone, backbone.input_spec, cfg.backbone._target_
    if runs:
        model = _single_run(cfg, runs).model
        return model.backbone, model.input_spec, str(runs[0].run_dir)
    raise ValueError(
        "kind=texture needs a network: run=<training run directory> (its backbone) or "
        "backbone=<option> (configs/backbone; random weights unless "
        "backbone.pretrained=true or backbone.weights=<file>)"
    )


def _texture_exemplar(cfg: DictConfig, runs: list[TrainedModel]) -> tuple[torch.Tensor, str]:
    """The exemplar image ``viz.texture.image``, else ``viz.texture.index`` of the dataset.

    Returns:
        ``(image (3, H, W), where it came from)``.
    """
    t = cfg.viz.texture
    if t.image:
        return load_image(t.image), str(t.image)
    dataset = load_dataset(cfg, runs, t.split)
    if dataset is None:
        raise ValueError(
            "kind=texture needs an exemplar: viz.texture.image=<file>, or a dataset "
            "(run=<run dir> or dataset=<option>) with viz.texture.index=<i>"
        )
    return dataset[int(t.index)][0], f"{t.split}[{int(t.index)}]"


def _write_texture_files(out: Path, exemplar: torch.Tensor, result: TextureResult) -> None:
    """The texture, the exemplar, both side by side, and the loss (CSV and curve)."""
    save_image(result.image, out / "texture.png")
    save_image(exemplar, out / "exemplar.png")
    _write_losses(result, out / "loss.csv")
    save_figure(loss_curve(result.losses, result.scale_starts), out / "loss.png")
    fig = figure(5.0, 2.8)
    for ax, image, title in zip(
        fig.subplots(1, 2), (exemplar, result.image), ("exemplar", "synthesized texture")
    ):
        draw_image(ax, image, title)
    save_figure(fig, out / "texture_pair.png")


def _texture_summary(
    result: TextureResult, layers: list[str], source: str, origin: str, optimizer: str
) -> dict[str, Any]:
    """The content of ``texture.json``: the inputs and the loss overall and per scale."""
    return {
        "network": source,
        "exemplar": origin,
        "layers": layers,
        "sizes": [list(s) for s in result.sizes],
        "optimizer": optimizer,
        "initial_loss": result.losses[0],
        "final_loss": result.losses[-1],
        "reduction": result.losses[0] / max(result.losses[-1], 1e-30),
        "per_scale": [
            {"size": list(size), "initial_loss": losses[0], "final_loss": losses[-1]}
            for size, losses in _per_scale(result)
        ],
    }


def _texture(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, Any]:
    """``kind=texture``: a texture with the Gram matrices of an exemplar (docs/visualize.md)."""
    t = cfg.viz.texture
    runs = load_runs(cfg, device)
    backbone, spec, source = _texture_network(cfg, runs)
    taps = FeatureTaps(backbone, t.layers, spec, avg_pool=t.pool == "avg").to(device)
    exemplar, origin = _texture_exemplar(cfg, runs)
    weights = OmegaConf.to_container(t.layer_weights) if t.layer_weights else None
    result = synthesize_texture(
        taps,
        exemplar,
        size=tuple(t.size) if t.size else None,
        scales=list(t.scales),
        optimizer=t.optimizer,
        steps=int(t.steps),
        lr=t.lr,
        layer_weights=weights,  # type: ignore[arg-type]
        tv_weight=float(t.tv_weight),
        seed=int(cfg.seed),
        desc="texture" if cfg.progress else None,
    )
    _write_texture_files(out, exemplar, result)
    summary = _texture_summary(result, taps.layers, source, origin, t.optimizer)
    if runs:
        summary["classified"] = _classify_texture(runs[0], exemplar, result.image, device)
    _write_json(out / "texture.json", summary)
    log.info(
        "Texture: Gram loss %.4g -> %.4g (%.1fx) at %s; written to %s",
        summary["initial_loss"],
        summary["final_loss"],
        summary["reduction"],
        ", ".join(taps.layers),
        out,
    )
    return summary


@torch.no_grad()
def _classify_texture(
    run: TrainedModel, exemplar: torch.Tensor, texture: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """What the run's model makes of the exemplar and of its texture: does the texture keep
    what the classifier uses?"""
    model = run.model.eval()
    probs = [
        model(image[None].to(device)).float().softmax(1)[0].cpu() for image in (exemplar, texture)
    ]
    c = int(probs[0].argmax())
    return {
        "exemplar_class": run.classes[c],
        "exemplar_prob": float(probs[0][c]),
        "texture_prob": float(probs[1][c]),
        "texture_class": run.classes[int(probs[1].argmax())],
    }


def _per_scale(result: TextureResult) -> list[tuple[tuple[int, int], list[float]]]:
    """``[((H, W), the losses of that scale's run), ...]`` in order."""
    bounds = itertools.pairwise([*result.scale_starts, len(result.losses)])
    return [(size, result.losses[a:b]) for size, (a, b) in zip(result.sizes, bounds)]


def _write_losses(result: TextureResult, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scale", "height", "width", "iteration", "loss"])
        for s, ((h, w), losses) in enumerate(_per_scale(result)):
            writer.writerows([s, h, w, i, loss] for i, loss in enumerate(losses))


def _inverse_targets(classes: Sequence[str], chosen: Any, max_classes: int) -> list[int]:
    """The class indices ``viz.inverse.classes`` names, else the first ``max_classes``."""
    if chosen is None:
        return list(range(min(len(classes), int(max_classes))))
    return [_class_index(c, classes, "viz.inverse.classes") for c in chosen]


def _inverse_size(
    cfg: DictConfig, runs: list[TrainedModel]
) -> tuple[tuple[int, int], Dataset | None]:
    """``viz.inverse.size``, else the size of the first test image.

    Returns:
        ``((H, W), the test split when it was read for this, else None)``.
    """
    v = cfg.viz.inverse
    if v.size:
        return (int(v.size[0]), int(v.size[1])), None
    dataset = load_dataset(cfg, runs, "test")
    if dataset is None:
        raise ValueError("viz.inverse.size: set it ([H, W]) when the run has no dataset")
    height, width = dataset[0][0].shape[-2:]
    return (int(height), int(width)), dataset


def _texture_starts(
    cfg: DictConfig,
    runs: list[TrainedModel],
    dataset: Dataset | None,
    size: tuple[int, int],
    targets: list[int],
    device: torch.device,
) -> torch.Tensor:
    """``viz.inverse.init=texture``: (K, 3, H, W) textures of a test image of each target."""
    dataset = dataset or load_dataset(cfg, runs, "test")
    if dataset is None:
        raise ValueError("viz.inverse.init=texture needs the run's (or a) dataset")
    t = cfg.viz.texture
    model = runs[0].model
    taps = FeatureTaps(model.backbone, t.layers, model.input_spec, t.pool == "avg").to(device)
    textures = [
        synthesize_texture(
            taps,
            _first_of_class(dataset, c),
            size=size,
            optimizer=t.optimizer,
            steps=int(t.steps),
            lr=t.lr,
            tv_weight=float(t.tv_weight),
            seed=int(cfg.seed) + i,
            desc=f"start {i + 1}/{len(targets)}" if cfg.progress else None,
        ).image
        for i, c in enumerate(targets)
    ]
    return torch.stack(textures)


def _write_inverse_files(
    out: Path, result: InverseResult, targets: list[int], classes: Sequence[str], columns: int
) -> None:
    """One PNG per class, the labelled grid and the objective's curve."""
    mean_prob = result.probs.mean(1)
    for k, c in enumerate(targets):
        save_image(result.images[k], out / "maximal" / f"{c:03d}_{classes[c]}.png")
    labels = [f"{classes[c]}\nP={p:.3f}" for c, p in zip(targets, mean_prob.tolist())]
    save_figure(labelled_grid(result.images, labels, columns=columns), out / "grid.png")
    save_figure(
        loss_curve(result.objective, ylabel="mean objective (maximized)"), out / "objective.png"
    )


def _inverse(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, Any]:
    """``kind=inverse``: the maximal image of each chosen class (docs/visualize.md)."""
    v = cfg.viz.inverse
    runs = load_runs(cfg, device)
    if not runs:
        raise ValueError("kind=inverse needs run=<training run dir> (or run=[dir1,dir2,...])")
    classes = runs[0].classes
    targets = _inverse_targets(classes, v.classes, v.max_classes)
    size, dataset = _inverse_size(cfg, runs)
    init = None
    if v.init == "texture":
        init = _texture_starts(cfg, runs, dataset, size, targets, device)
    elif v.init != "noise":
        raise ValueError(f"viz.inverse.init must be noise or texture, got {v.init!r}")
    result = maximal_images(
        [r.model for r in runs],
        targets,
        size,
        steps=int(v.steps),
        lr=float(v.lr),
        tv_weight=float(v.tv_weight),
        tv_beta=float(v.tv_beta),
        norm_weight=float(v.norm_weight),
        norm_p=float(v.norm_p),
        init=init,
        seed=int(cfg.seed),
        desc="inverse" if cfg.progress else None,
    )
    _write_inverse_files(out, result, targets, classes, int(v.columns))
    summary = {
        "runs": [str(r.run_dir) for r in runs],
        "size": list(size),
        "init": v.init,
        "classes": {
            classes[c]: {"index": c, "prob": result.probs[k].tolist()}
            for k, c in enumerate(targets)
        },
        "min_prob": float(result.probs.min()),
    }
    _write_json(out / "inverse.json", summary)
    log.info(
        "Maximal images of %d classes (P(c|I) >= %.3f); written to %s",
        len(targets),
        summary["min_prob"],
        out,
    )
    return summary


def _maps_supported(trained: TrainedModel) -> bool:
    model = trained.model
    return (
        isinstance(model.pooling, (BilinearPool, DemocraticPool))
        and len(model.pooling.channels) == 1
    )


def _map_images(
    dataset: Dataset, split: str, chosen: Any, num_images: int
) -> tuple[list[Any], torch.Tensor, list[int]]:
    """The images ``viz.maps.indices`` names, else the first ``num_images``.

    Returns:
        ``(indices, (n, 3, H, W) images, their labels)``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    indices = list(chosen) if chosen else list(range(min(n, int(num_images))))
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"viz.maps.indices: {bad} outside the {split} split (0..{n - 1})")
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([im for im, _ in items])
    return indices, images, [int(label) for _, label in items]


def _save_maps(path: Path, indices: list[Any], labels: list[int], maps: ImageMaps) -> None:
    """Every map, the labels and the explained logits as one ``.npz`` file."""
    arrays = {key: getattr(maps, key).numpy() for key in MAP_KEYS}
    np.savez_compressed(
        path, indices=np.asarray(indices), labels=np.asarray(labels), grid=np.asarray(maps.grid),
        logits=maps.explained.logits.numpy(), **arrays,
    )  # fmt: skip


def _map_rows(
    maps: ImageMaps, indices: list[Any], labels: list[int], classes: Sequence[str], top_k: int
) -> list[dict[str, Any]]:
    """Per image of ``maps.json``: label, top classes, spread of each map and its checks."""
    probs = maps.explained.logits.float().softmax(1)
    spreads = {k: spread(getattr(maps, k)) for k in ("sum", "democratic", "matrix")}
    rows = []
    for i, index in enumerate(indices):
        top = probs[i].topk(min(top_k, probs.shape[1]))
        rows.append(
            {
                "index": int(index),
                "label": classes[labels[i]],
                "top": [[classes[c], p] for p, c in zip(top.values.tolist(), top.indices.tolist())],
                "spread": {k: float(v[i]) for k, v in spreads.items()},
                "relative_error": {k: float(v[i]) for k, v in maps.checks.items()},
            }
        )
    return rows


def _maps(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, Any]:
    """``kind=maps``: contribution maps of a few images (docs/visualize.md)."""
    m = cfg.viz.maps
    trained = _single_run(cfg, load_runs(cfg, device))
    if not _maps_supported(trained):
        raise ValueError(
            "kind=maps needs a one-stream model with a matrix pooling head (pooling=sum, "
            f"democratic or spectral); this run pools with {type(trained.model.pooling).__name__}"
            f" on {len(trained.model.pooling.channels)} stream(s)"
        )
    dataset = load_dataset(cfg, [trained], m.split)
    if dataset is None:
        raise ValueError("kind=maps: the run has no dataset config; pass dataset=<option>")
    indices, images, labels = _map_images(dataset, m.split, m.indices, m.num_images)
    maps = compute_maps(
        trained.model,
        images.to(device),
        gamma=m.gamma,
        tau=float(m.tau),
        iters=int(m.iters),
        power=m.power,
    )
    maps = _to_cpu(maps)
    fig = draw_maps(
        images, maps, trained.classes, labels, top_k=int(m.top_k), opacity=float(m.opacity)
    )
    save_figure(fig, out / "maps.png", dpi=int(m.dpi))
    _save_maps(out / "maps.npz", indices, labels, maps)
    summary = {
        "run": str(trained.run_dir),
        "split": m.split,
        "grid": list(maps.grid),
        "gamma": maps.gamma,
        "matrix": maps.matrix_label,
        "images": _map_rows(maps, indices, labels, trained.classes, int(m.top_k)),
    }
    _write_json(out / "maps.json", summary)
    log.info("Contribution maps of %d images written to %s", len(indices), out)
    return summary


def _to_cpu(maps: ImageMaps) -> ImageMaps:
    """Moves every tensor of ``maps`` to the CPU (in place) for drawing and saving."""
    for key in MAP_KEYS:
        setattr(maps, key, getattr(maps, key).cpu())
    e = maps.explained
    for key in ("values", "target", "score", "bias", "ridge", "logits"):
        setattr(e, key, getattr(e, key).cpu())
    maps.checks = {k: v.cpu() for k, v in maps.checks.items()}
    return maps


def _report(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, Any]:
    r = cfg.viz.report
    trained = _single_run(cfg, load_runs(cfg, device))
    dataset = load_dataset(cfg, [trained], r.split)
    if dataset is None:
        raise ValueError("kind=report: the run has no dataset config; pass dataset=<option>")
    path = build_report(
        trained,
        dataset,
        out / "report.html",
        split=r.split,
        pairs=int(r.pairs),
        examples=int(r.examples),
        batch_size=int(r.batch_size),
        max_images=r.max_images,
        device=device,
        opacity=float(cfg.viz.maps.opacity),
        maps_supported=_maps_supported(trained),
        progress=bool(cfg.progress),
    )
    log.info("Report written to %s", path)
    return {"report": str(path)}


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Runs one ``kind`` of visualization and writes its files.

    Args:
        cfg: The composed ``configs/viz.yaml``.

    Returns:
        A summary of what was computed (also written as ``<kind>.json`` for texture,
        inverse and maps), with ``output_dir``.

    Raises:
        ValueError: an unknown kind or option, naming the key.
        FileNotFoundError: a missing run or image file.
    """
    kind = cfg.get("kind")
    if kind is None:
        raise ValueError(
            "kind is not set: bcnn-viz kind=<texture|inverse|maps|report> run=<training run dir>"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (kind=maps ...), got {kind!r}")
    out = output_dir(cfg, "bcnn-viz", "bcnn.viz.visualize")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))
    check_device(str(cfg.device), "device")
    device = resolve_device(str(cfg.device))
    handlers = {"texture": _texture, "inverse": _inverse, "maps": _maps, "report": _report}
    summary = handlers[kind](cfg, out, device)
    summary["output_dir"] = str(out)
    return summary
