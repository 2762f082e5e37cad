"""bcnn-viz: texture synthesis, maximal images, contribution maps (definitions and files)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from bcnn.data.synthetic import SyntheticDataset
from bcnn.engine import train
from bcnn.engine.runs import load_trained
from bcnn.models import build_model
from bcnn.models.backbones import VGG16, SmallCNN, TimmBackbone
from bcnn.viz import (
    FeatureTaps,
    class_contributions,
    democratic_contributions,
    matrix_contributions,
    maximal_images,
    sum_contributions,
    synthesize_texture,
    visualize,
)
from bcnn.viz.contributions import local_features, pooled
from bcnn.viz.figures import load_image
from bcnn.viz.inverse import class_log_prob, total_variation
from tests.conftest import CONFIG_DIR, REPO_ROOT, compose_config, run_train, subprocess_env

# A linear stage on cached descriptors of a one-block CNN: about a second, and accurate
# enough (~95% on the built-in dataset) for its maximal images to be meaningful.
TINY_RUN = [
    "debug=smoke",
    "backbone.channels=[32]",
    "dataset.trainval_size=1200",
    "dataset.test_size=60",
    "trainer.stages=[linear]",
    "trainer.limit_train_batches=null",
    "trainer.linear.epochs=10",
    "trainer.linear.batch_size=32",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(compose_config(TINY_RUN, run_dir))
    return run_dir


def compose_viz(overrides: list[str], output_dir: Path) -> DictConfig:
    """Composes ``configs/viz.yaml`` like ``bcnn-viz`` would."""
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("viz", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def synthetic_images(n: int) -> tuple[torch.Tensor, list[int]]:
    ds = SyntheticDataset(split="test", test_size=n)
    return torch.stack([ds[i][0] for i in range(n)]), [ds[i][1] for i in range(n)]


# --- texture synthesis ---------------------------------------------------------------------


@pytest.mark.parametrize(("optimizer", "steps"), [("lbfgs", 30), ("adam", 60)])
def test_synthesis_lowers_the_gram_loss_tenfold(optimizer: str, steps: int) -> None:
    torch.manual_seed(0)
    taps = FeatureTaps(SmallCNN((16, 32)))
    assert taps.layers == ["relu1", "relu2"]
    exemplar = synthetic_images(1)[0][0]
    result = synthesize_texture(taps, exemplar, optimizer=optimizer, steps=steps, seed=1)
    assert len(result.losses) == steps + 1
    assert result.losses[-1] <= result.losses[0] / 10, (result.losses[0], result.losses[-1])
    assert result.image.shape == (3, 32, 32)
    assert float(result.image.min()) >= 0 and float(result.image.max()) <= 1


def test_multiscale_synthesis_runs_coarse_to_fine_at_any_output_size() -> None:
    torch.manual_seed(0)
    taps = FeatureTaps(SmallCNN((8, 16)))
    exemplar = synthetic_images(1)[0][0]
    result = synthesize_texture(taps, exemplar, size=(24, 40), scales=(0.5, 1.0), steps=15)
    assert result.sizes == [(12, 20), (24, 40)]
    assert result.scale_starts == [0, 16]
    assert result.image.shape == (3, 24, 40)
    last = result.losses[result.scale_starts[1] :]
    assert last[-1] < last[0]
    with pytest.raises(ValueError, match=r"viz\.texture\.scales"):
        synthesize_texture(taps, exemplar, scales=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"viz\.texture\.layer_weights"):
        synthesize_texture(taps, exemplar, layer_weights={"relu9": 1.0})


def test_texture_settings_for_clean_pictures_take_effect() -> None:
    torch.manual_seed(0)
    backbone = SmallCNN((8, 16))
    taps = FeatureTaps(backbone, avg_pool=True)
    pools = [
        type(m) for m in taps.modules() if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))
    ]
    assert pools == [torch.nn.AvgPool2d]
    assert isinstance(backbone.features[2], torch.nn.MaxPool2d)  # the caller's is untouched
    exemplar = synthetic_images(1)[0][0]
    # The start: the exemplar's mean colour plus noise of amplitude 0.2, no saturated pixel.
    start = synthesize_texture(taps, exemplar, optimizer="adam", lr=1e-9, steps=1).image
    mean = exemplar.float().mean((1, 2), keepdim=True) / 255
    assert float((start - mean).abs().max()) <= 0.1 + 1e-6
    # The total-variation prior smooths the texture at a small cost in Gram loss.
    rough, smooth = (synthesize_texture(taps, exemplar, steps=15, tv_weight=w) for w in (0.0, 0.5))
    assert float(total_variation(smooth.image[None])) < 0.5 * float(
        total_variation(rough.image[None])
    )
    assert smooth.losses[-1] < smooth.losses[0] / 5


def test_vgg_d_taps_reach_the_texture_layers_without_changing_the_backbone() -> None:
    backbone = VGG16()
    taps = FeatureTaps(backbone)
    assert taps.layers == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    with torch.no_grad():
        maps = taps(torch.rand(1, 3, 32, 32))
    shapes = [tuple(m.shape[1:]) for m in maps.values()]
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert all(float(m.min()) >= 0 for m in maps.values())  # after the ReLUs
    # The caller's backbone keeps its in-place ReLUs and its gradients.
    assert backbone.features[1].inplace and backbone.features[0].weight.requires_grad
    with torch.no_grad():
        conv = FeatureTaps(backbone, ["conv1_1", "relu1_1"])(torch.rand(1, 3, 8, 8))
    # The conv output is not overwritten by the ReLU that follows it.
    assert float(conv["conv1_1"].min()) < 0 and torch.equal(conv["conv1_1"].relu(), conv["relu1_1"])
    with pytest.raises(ValueError, match=r"viz\.texture\.layers.*relu9_9"):
        FeatureTaps(backbone, ["relu9_9"])


def test_timm_backbones_expose_their_feature_levels() -> None:
    backbone = TimmBackbone("resnet18", out_index=3)
    taps = FeatureTaps(backbone)
    assert taps.layers == ["level0", "level1", "level2", "level3"]
    with torch.no_grad():
        maps = taps(torch.rand(1, 3, 64, 64))
    channels = backbone.model.feature_info.info
    assert [m.shape[1] for m in maps.values()] == [channels[i]["num_chs"] for i in range(4)]
    assert [m.shape[-1] for m in maps.values()] == [32, 16, 8, 4]


# --- maximal images ------------------------------------------------------------------------


def test_maximal_images_make_their_class_likely(tiny_run: Path) -> None:
    model = load_trained(tiny_run).model
    targets = [0, 5, 11]
    start = torch.full((3, 3, 32, 32), 0.5)
    with torch.no_grad():
        _, before = class_log_prob([model], start, torch.tensor(targets))
    result = maximal_images([model], targets, (32, 32), steps=100)
    assert result.images.shape == (3, 3, 32, 32)
    assert float(before.max()) < 0.5
    assert result.probs.shape == (3, 1) and float(result.probs.min()) > 0.9, result.probs
    with torch.no_grad():  # the reported probabilities are those of the images
        again = model(result.images).softmax(1)[torch.arange(3), targets]
    torch.testing.assert_close(again, result.probs[:, 0], rtol=1e-4, atol=1e-5)
    assert result.objective[-1] > result.objective[0]


def test_the_prior_makes_maximal_images_smoother(tiny_run: Path) -> None:
    model = load_trained(tiny_run).model
    rough = maximal_images([model], [2], (32, 32), steps=20, tv_weight=0.0, norm_weight=0.0)
    smooth = maximal_images([model], [2], (32, 32), steps=20, tv_weight=20.0, norm_weight=0.0)
    assert float(total_variation(smooth.images)) < float(total_variation(rough.images))


# --- contributions -------------------------------------------------------------------------


def _features(b: int = 2, n: int = 49, d: int = 12, seed: int = 0) -> torch.Tensor:
    """ReLU features whose locations all carry energy (none below the Sinkhorn floor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen, dtype=torch.float64).relu()
    return x * (0.5 + torch.rand(b, n, 1, generator=gen, dtype=torch.float64)) + 0.01


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_weighted_contributions_sum_to_the_descriptor_energy(gamma: float) -> None:
    X = _features()
    for c in (sum_contributions(X), democratic_contributions(X, gamma=gamma)):
        torch.testing.assert_close(c.weights.sum(1), torch.ones(2, dtype=X.dtype))
        torch.testing.assert_close(c.descriptor, pooled(X, c.weights))
        energy = c.descriptor.square().sum((1, 2))
        torch.testing.assert_close((c.weights * c.values).sum(1), energy, rtol=1e-10, atol=0)
        # C(x) = <x x^T, xi>, entry by entry.
        i = 7
        phi = X[:, i, :, None] * X[:, i, None, :]
        torch.testing.assert_close(c.values[:, i], (phi * c.descriptor).sum((1, 2)))
    # Matrix normalization: sum_x (1/n) C_f(x) = <A, f(A)>.
    c = matrix_contributions(X, p=0.5)
    A = pooled(X, c.weights)
    torch.testing.assert_close(
        (c.weights * c.values).sum(1), (A * c.descriptor).sum((1, 2)), rtol=1e-10, atol=0
    )


def test_gamma_zero_weights_equalize_the_contributions() -> None:
    X = _features()
    n = X.shape[1]
    demo = democratic_contributions(X, gamma=0.0, iters=50)
    shares = demo.shares()
    # Every location contributes the same 1/n of ||xi||^2: alpha(x) C(x) is constant,
    # i.e. C(x) is proportional to 1 / alpha(x).
    torch.testing.assert_close(shares, torch.full_like(shares, 1.0 / n), rtol=1e-4, atol=0)
    assert demo.alpha is not None
    ac = demo.alpha * demo.values
    assert float((ac.std(1) / ac.mean(1)).max()) < 1e-4
    # Sum pooling does not: its shares vary widely on the same features.
    assert float(sum_contributions(X).shares().std(1).min() * n) > 0.2
    # gamma = 1 is sum pooling.
    torch.testing.assert_close(
        democratic_contributions(X, gamma=1.0).values, sum_contributions(X).values
    )


def test_matrix_power_flattens_the_contributions() -> None:
    X = _features()
    spreads = [float(matrix_contributions(X, p=p).shares().std(1).mean()) for p in (1.0, 0.5, 0.2)]
    assert spreads[0] > spreads[1] > spreads[2]
    torch.testing.assert_close(
        matrix_contributions(X, p=1.0, eps=0.0).values, sum_contributions(X).values
    )


CHAINS = [
    [],  # sum pooling, signed sqrt, L2
    ["normalization=none"],
    ["normalization=sqrt_l2"],
    ["normalization=log_l2"],
    ["pooling=spectral"],
    ["pooling=democratic"],
    ["pooling.proj_dim=8", "normalization.vectorize.triu=true"],
    ["classifier=lowrank", "~normalization.vectorize"],
]


@pytest.mark.parametrize("overrides", CHAINS, ids=lambda o: " ".join(o) or "default")
def test_class_maps_split_the_score_exactly(overrides: list[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(compose_config(["backbone.channels=[16]", *overrides], tmp_path), 12)
    model.eval()
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_()
    images, _ = synthetic_images(3)
    explained = class_contributions(model, images)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(explained.logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(explained.target, logits.argmax(1))
    total = explained.values.sum(1) + explained.bias + explained.ridge
    torch.testing.assert_close(total, explained.score, rtol=1e-4, atol=1e-5)
    # The ridge's share is a small remainder, and only with matrix functions.
    has_matrix = any(s.phase == "matrix" for s in model.normalization.steps.values())
    assert bool((explained.ridge != 0).any()) == has_matrix
    assert float(explained.ridge.abs().max()) < 0.05 * float(explained.score.abs().max())
    assert explained.values.shape == (3, 32 * 32)


def test_class_maps_without_normalization_are_the_linear_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(
        compose_config(["backbone.channels=[8]", "normalization=none"], tmp_path), 4
    )
    model.eval()
    with torch.no_grad():
        model.classifier.weight.normal_()
    images, _ = synthetic_images(2)
    target = torch.tensor([1, 3])
    explained = class_contributions(model, images, target)
    X = local_features(model, images).X
    W = model.classifier.weight[target].view(2, 8, 8)
    expected = torch.einsum("bnd,bde,bne->bn", X, W, X) / X.shape[1]
    torch.testing.assert_close(explained.values, expected, rtol=1e-4, atol=1e-6)


def test_two_stream_and_first_order_heads_are_refused(tmp_path: Path) -> None:
    model = build_model(compose_config(["backbone.channels=[8]", "pooling=avg"], tmp_path), 4)
    with pytest.raises(ValueError, match="matrix pooling head"):
        class_contributions(model, synthetic_images(1)[0])


# --- the command ---------------------------------------------------------------------------


def test_every_viz_option_composes(tmp_path: Path) -> None:
    options = sorted(p.stem for p in (CONFIG_DIR / "viz").glob("*.yaml"))
    assert options == ["default", "smoke"]
    for option in options:
        cfg = compose_viz(["kind=maps", f"viz={option}"], tmp_path)
        assert set(cfg.viz) == {"texture", "inverse", "maps", "report"}
        assert cfg.get("backbone") is None and cfg.get("dataset") is None


def test_maps_command_writes_its_files_and_leaves_the_run_alone(tiny_run: Path, tmp_path: Path):
    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    out = tmp_path / "viz"
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bcnn.cli.viz",
            "kind=maps",
            f"run={tiny_run}",
            "viz=smoke",
            "viz.maps.indices=[0,3,4]",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"maps.png", "maps.json", "maps.npz", "viz.log"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "maps.json").read_text())
    assert [row["index"] for row in summary["images"]] == [0, 3, 4]
    for row in summary["images"]:
        assert max(row["relative_error"].values()) < 1e-4
        assert len(row["top"]) == 3
    arrays = np.load(out / "maps.npz")
    assert arrays["class_map"].shape == (3, 32 * 32) and tuple(arrays["grid"]) == (32, 32)
    assert (out / "maps.png").stat().st_size > 10_000
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before


def test_texture_from_a_backbone_option_without_a_run(tmp_path: Path) -> None:
    cfg = compose_viz(
        [
            "kind=texture",
            "backbone=small",
            "backbone.channels=[8,16]",
            "dataset=synthetic",
            "dataset.test_size=4",
            "viz.texture.steps=20",
            "viz.texture.scales=[1.0]",
            "viz.texture.index=2",
        ],
        tmp_path,
    )
    summary = visualize(cfg)
    assert summary["layers"] == ["relu1", "relu2"] and summary["reduction"] > 10
    for name in ("texture.png", "exemplar.png", "loss.csv", "loss.png", "texture_pair.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "scale,height,width,iteration,loss" and len(rows) == 1 + 21


def test_texture_command_passes_the_pooling_and_prior_on(tmp_path: Path) -> None:
    common = "kind=texture backbone=small backbone.channels=[8,16] dataset=synthetic "
    common += "dataset.test_size=4 viz.texture.steps=10"
    defaults = compose_viz(common.split(), tmp_path).viz.texture
    assert defaults.pool == "avg" and defaults.tv_weight > 0 and len(defaults.scales) > 1
    images = {}
    for extra in ("", "viz.texture.pool=max", "viz.texture.tv_weight=0"):
        out = tmp_path / (extra.split("=")[0] or "default")
        visualize(compose_viz([*common.split(), *extra.split()], out))
        images[extra] = load_image(out / "texture.png").float() / 255
    assert not torch.equal(images[""], images["viz.texture.pool=max"])
    tv = {k: float(total_variation(v[None])) for k, v in images.items()}
    assert tv[""] < tv["viz.texture.tv_weight=0"], tv


def test_inverse_command_from_textures_and_several_runs(tiny_run: Path, tmp_path: Path) -> None:
    cfg = compose_viz(
        f"kind=inverse run=[{tiny_run},{tiny_run}] viz=smoke viz.inverse.init=texture "
        "viz.inverse.classes=[pairing_3102,4]".split(),
        tmp_path,
    )
    summary = visualize(cfg)
    classes = load_trained(tiny_run).classes
    assert list(summary["classes"]) == ["pairing_3102", classes[4]]
    assert all(len(v["prob"]) == 2 for v in summary["classes"].values())
    assert (tmp_path / "grid.png").is_file()
    assert len(list((tmp_path / "maximal").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "kind is not set"),
        (["kind=movie"], "kind must be one of texture, inverse, maps, report"),
        (["kind=texture"], "kind=texture needs a network"),
        (["kind=maps"], r"kind=maps needs run="),
        (["kind=inverse", "run=RUN", "viz.inverse.classes=[nope]"], "unknown class 'nope'"),
        (["kind=maps", "run=RUN", "viz.maps.indices=[999]"], r"viz\.maps\.indices: \[999\]"),
    ],
)
def test_bad_requests_fail_with_the_key_to_fix(
    overrides: list[str], message: str, tiny_run: Path, tmp_path: Path
) -> None:
    overrides = [o.replace("RUN", str(tiny_run)) for o in overrides]
    with pytest.raises(ValueError, match=message):
        visualize(compose_viz(overrides, tmp_path))


def test_command_prints_a_user_error_as_one_message(tmp_path: Path) -> None:
    viz = [sys.executable, "-m", "bcnn.cli.viz"]
    proc = run_train(["kind=movie"], cwd=tmp_path, timeout=120, script=viz, full_error=False)
    assert proc.returncode == 1
    assert "bcnn-viz: error: kind must be one of texture, inverse, maps, report" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --- the report ----------------------------------------------------------------------------

try:  # optional: only where a browser is installed too
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = ("chromium-headless-shell", "chromium", "chromium-browser")
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base"}


class _Page(HTMLParser):
    """Collects tags, headings and URL-valued attributes; checks that tags nest."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.headings: list[str] = []
        self.styles: list[str] = []
        self._heading: str | None = None
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action", "background"):
                self.urls.append((tag, name, value or ""))
            if name == "style":
                self.styles.append(value or "")
        if tag in ("h1", "h2", "h3"):
            self._heading = ""
        self._style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None
        self._style = False

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading += data
        if self._style:
            self.styles.append(data)


@pytest.fixture(scope="module")
def report_page(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    # Noisier test images than the run's, so that some are misclassified.
    cfg = compose_viz(
        f"kind=report run={tiny_run} viz=smoke dataset=synthetic dataset.test_size=48 "
        "dataset.pixel_noise=1.5".split(),
        out,
    )
    return Path(visualize(cfg)["report"])


def test_report_is_one_html_file_that_references_nothing_else(report_page: Path) -> None:
    assert [p.name for p in report_page.parent.iterdir()] == ["report.html"]
    page = _Page()
    page.feed(report_page.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], f"unclosed tags: {page.stack}"
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert not any("url(" in s or "@import" in s for s in page.styles)
    images = [value for tag, name, value in page.urls if tag == "img"]
    assert len(page.urls) == len(images) >= 4  # curves, confusion, two confused pairs
    for uri in images:
        assert uri.startswith("data:image/png;base64,"), uri[:60]
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.headings[1:4] == ["Accuracy", "Training curves", "Confusion matrix (test)"]
    assert "Most confused pairs" in page.headings
    assert sum("\u2192" in h for h in page.headings) == 2  # viz=smoke: two pairs


def test_report_renders_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    if browser is None:
        pytest.skip(
            "Debian's headless Chromium is not installed (apt install chromium-headless-shell "
            "or chromium)"
        )
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    problems: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        try:
            tab = chromium.new_page(viewport={"width": 1200, "height": 900})
            tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda err: problems.append(str(err)))
            tab.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
            tab.goto(report_page.as_uri(), wait_until="load")
            loaded = tab.evaluate(
                "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
            )
            height = tab.evaluate("document.documentElement.scrollHeight")
            tab.screenshot(path=str(shot), full_page=True)
        finally:
            chromium.close()
    assert problems == []
    assert len(loaded) >= 4 and all(loaded)
    assert height > 1500
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, height)
