"""Every backbone x pooling x normalization x classifier option, built from the configs.

Every pair of pooling x normalization, pooling x classifier and normalization x classifier
options runs on the small backbone; VGG-D (one stream and two) runs with every pooling, the
fc7 backbones with their papers' two (224x224 inputs) and the other backbones with three
that cover matrix, weighted and sketched descriptors (random weights, 64x64 inputs).
Incompatible combinations must fail at build time with a ValueError that says what to change.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

import bcnn.config  # noqa: F401  (registers the train_schema the root config extends)
from bcnn.config import instantiate
from bcnn.engine import train
from bcnn.models import build_model
from bcnn.models.plan import plan_model
from tests.conftest import compose_config

NUM_CLASSES = 3
POOLINGS = ["avg", "sum", "democratic", "democratic_avg", "spectral", "compact", "fisher"]
NORMALIZATIONS = [
    "none",
    "l2",
    "signsqrt_l2",
    "log_l2",
    "sqrt_l2",
    "log_signsqrt_l2",
    "sqrt_signsqrt_l2",
]
CLASSIFIERS = ["linear", "lowrank", "svm"]
VECTOR_POOLINGS = {"avg", "democratic_avg", "compact", "fisher"}
MATRIX_NORMALIZATIONS = {"log_l2", "sqrt_l2", "log_signsqrt_l2", "sqrt_signsqrt_l2"}
# Per backbone: overrides that keep it fast, the input size, the channels after pooling
# (projection included) and the normalization used with each pooling.
BACKBONES = {
    "vgg_d": ([], 64, 512),
    "vgg_m": ([], 64, 512),
    "densenet201": (["pooling.proj_dim=24"], 64, 24),
    "timm": (["backbone.name=resnet18"], 64, 512),
    "vgg_dm": ([], 64, (512, 512)),
    # fc6 needs the 7x7 (6x6) pool5 map of a 224 image; narrow fc layers keep it fast.
    "vgg_d_fc7": (["backbone.fc_dim=32"], 224, 32),
    "vgg_m_fc7": (["backbone.fc_dim=32"], 224, 32),
    # The ViT-B/16 and ConvNeXt-B presets, as their tiny family members.
    "vit_b16": (["backbone.name=vit_tiny_patch16_224"], 64, 192),
    "convnext_b": (["backbone.name=convnext_atto"], 64, 320),
}
REAL_NORM = {
    "avg": "l2",
    "sum": "sqrt_signsqrt_l2",
    "democratic": "log_l2",
    "democratic_avg": "signsqrt_l2",
    "spectral": "signsqrt_l2",
    "compact": "signsqrt_l2",
    "fisher": "signsqrt_l2",
}


def _options(group: str) -> set[str]:
    # Files starting with "_" are shared parts of the options, not options.
    return {
        p.name[: -len(".yaml")]
        for p in files("bcnn.configs").joinpath(group).iterdir()
        if p.name.endswith(".yaml") and not p.name.startswith("_")
    }


def _compose(overrides: list[str]):
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def _expected_error(
    pooling: str, normalization: str, classifier: str, two_stream: bool
) -> str | None:
    """The regex of the build error for an incompatible combination, None if it works."""
    if two_stream and pooling in ("democratic", "democratic_avg", "fisher"):
        return "does not combine two feature maps"
    if pooling in VECTOR_POOLINGS and normalization in MATRIX_NORMALIZATIONS:
        return r"normalization\.(sqrt|log): .* acts on matrices but receives vectors"
    if pooling in VECTOR_POOLINGS and classifier == "lowrank":
        return "lowrank reads the pooled matrix"
    if two_stream and (normalization in MATRIX_NORMALIZATIONS or pooling == "spectral"):
        return r"normalization\.\w+: .* needs the symmetric x x\^T of one stream"
    return None


def _descriptor_shape(pooling: str, classifier: str, channels, cfg) -> tuple[int, ...]:
    if pooling in ("avg", "democratic_avg"):
        return (sum(channels) if isinstance(channels, tuple) else channels,)
    if pooling == "compact":
        return (cfg.pooling.sketch.out_dim,)
    if pooling == "fisher":
        return (2 * cfg.pooling.num_components * channels,)
    d1, d2 = channels if isinstance(channels, tuple) else (channels, channels)
    return (d1, d2) if classifier == "lowrank" else (d1 * d2,)


def _check_model(overrides: list[str], size: int, channels, pooling: str, norm: str, clf: str):
    cfg = _compose(overrides)
    error = _expected_error(pooling, norm, clf, isinstance(channels, tuple))
    if error is not None:
        with pytest.raises(ValueError, match=error):
            build_model(cfg, NUM_CLASSES)
        return
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).train()
    if clf in ("linear", "svm"):
        # The zero-initialized classifier would pass no gradient back to the features.
        with torch.no_grad():
            torch.nn.init.normal_(model.classifier.weight, std=0.1)
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    if pooling == "fisher":  # the trainer fits the GMM before training
        with torch.no_grad():
            model.pooling.fit([model.backbone(model.normalize_input(x))])
    desc = model.features(x)
    assert desc.shape == (2, *_descriptor_shape(pooling, clf, channels, cfg))
    assert torch.isfinite(desc).all()
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the SVM's weights are fitted, not trained by gradients
            assert name.startswith("classifier.") and clf == "svm", name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    # The signal reaches the input layer and every head parameter. (Not every backbone
    # parameter: timm's ResNets zero-init the last BatchNorm of each residual branch.)
    for p in [next(model.backbone.parameters()), *model.head_parameters()]:
        assert not p.requires_grad or p.grad.abs().sum() > 0
    # Every parameter is in exactly one optimizer group.
    groups = model.param_groups(lr=0.1, backbone_lr=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_every_option_is_tested():
    assert _options("pooling") == set(POOLINGS)
    assert _options("normalization") == set(NORMALIZATIONS)
    assert _options("classifier") == set(CLASSIFIERS)
    assert _options("backbone") == {"small", *BACKBONES}


# A pairwise design: each pooling x normalization pair once, the classifier rotating so that
# each of them also meets every pooling and every normalization (a third of the full cube).
HEADS = [
    (pooling, normalization, CLASSIFIERS[(i + j) % len(CLASSIFIERS)])
    for i, pooling in enumerate(POOLINGS)
    for j, normalization in enumerate(NORMALIZATIONS)
]


def test_the_heads_cover_every_pair_of_options():
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        options = [POOLINGS, NORMALIZATIONS, CLASSIFIERS]
        assert {(h[a], h[b]) for h in HEADS} == {(x, y) for x in options[a] for y in options[b]}


@pytest.mark.parametrize(("pooling", "normalization", "classifier"), HEADS)
def test_small_backbone_all_heads(pooling, normalization, classifier):
    overrides = [
        "backbone=small",
        "backbone.channels=[8,12]",
        f"pooling={pooling}",
        f"normalization={normalization}",
        f"classifier={classifier}",
    ]
    if classifier == "lowrank":
        overrides.append("~normalization.vectorize")  # it reads the matrix
    if pooling == "compact":
        overrides.append("pooling.sketch.out_dim=64")
    if pooling == "fisher":
        overrides.append("pooling.num_components=2")
    _check_model(overrides, 16, 12, pooling, normalization, classifier)


# A pooling sees only the backbone's map: every pooling on VGG-D's one stream and two, the
# fc7 backbones (a 224 input, the slowest builds) with the heads of their papers (FC-CNN's
# average, FV-CNN's Fisher vector), the others with a matrix (sum), a weighted
# (democratic) and a sketched (compact) descriptor.
PAIRS = [
    (backbone, pooling)
    for backbone in BACKBONES
    for pooling in (
        POOLINGS
        if backbone in ("vgg_d", "vgg_dm")
        else ["avg", "fisher"]
        if backbone.endswith("_fc7")
        else ["sum", "democratic", "compact"]
    )
]


@pytest.mark.parametrize(("backbone", "pooling"), PAIRS)
def test_real_backbones_every_pooling(backbone, pooling):
    extra, size, channels = BACKBONES[backbone]
    norm = REAL_NORM[pooling]
    overrides = [f"backbone={backbone}", f"pooling={pooling}", f"normalization={norm}", *extra]
    if pooling == "compact":
        overrides.append("pooling.sketch.out_dim=1024")
    if pooling == "fisher":
        overrides.append("pooling.num_components=2")
    _check_model(overrides, size, channels, pooling, norm, "linear")


def test_two_stream_bilinear_with_lowrank_classifier():
    cfg = _compose(
        [
            "backbone=vgg_dm",
            "pooling=sum",
            "normalization=signsqrt_l2",
            "~normalization.vectorize",
            "classifier=lowrank",
            "classifier.rank=2",
        ]
    )
    model = build_model(cfg, NUM_CLASSES)
    # Square but not symmetric: x_a x_b^T of two 512-channel streams needs U V^T.
    assert not model.classifier.symmetric and model.classifier.V is not None
    x = torch.rand(1, 3, 64, 64)
    assert model.features(x).shape == (1, 512, 512)
    assert model(x).shape == (1, NUM_CLASSES)


def test_matrix_classifier_rejects_a_vectorizing_chain_and_vice_versa():
    with pytest.raises(ValueError, match=r"~normalization\.vectorize"):
        build_model(_compose(["classifier=lowrank"]), NUM_CLASSES)
    with pytest.raises(ValueError, match="add a vectorize step"):
        build_model(_compose(["~normalization.vectorize"]), NUM_CLASSES)


def test_two_stream_rejects_matrix_functions_and_triu():
    cfg = _compose(["backbone=vgg_dm", "pooling=sum", "normalization=sqrt_l2"])
    with pytest.raises(ValueError, match="two-stream"):
        build_model(cfg, NUM_CLASSES)
    cfg = _compose(
        ["backbone=vgg_dm", "pooling=sum", "normalization=l2", "normalization.vectorize.triu=true"]
    )
    with pytest.raises(ValueError, match=r"normalization\.vectorize: .*triu"):
        build_model(cfg, NUM_CLASSES)


def test_step_options_override_from_the_command_line():
    cfg = _compose(
        [
            "backbone=small",
            "pooling=spectral",
            "normalization.mpow.p=0.3",
            "normalization=sqrt_l2",
            "normalization.sqrt.iters=9",
            "normalization.sqrt.method=eigh",
            "normalization.sqrt.eps_mode=abs",
            "normalization.sqrt.eps=1.0",
            "normalization.l2=null",
        ]
    )
    model = build_model(cfg, NUM_CLASSES)
    steps = model.normalization.steps
    assert list(steps) == ["mpow", "sqrt", "vectorize"]  # matrix steps, then vectorize
    step = steps["sqrt"]
    assert (step.iters, step.method, step.eps_mode, step.eps) == (9, "eigh", "abs", 1.0)
    assert steps["mpow"].p == 0.3 and type(model.pooling).__name__ == "BilinearPool"


def test_a_step_added_on_the_command_line_runs_in_its_phase():
    cfg = _compose(
        [
            "normalization=l2",
            "+normalization.root={_target_:bcnn.models.normalization.MatrixSqrt,iters:3}",
        ]
    )
    model = build_model(cfg, NUM_CLASSES)
    assert list(model.normalization.steps) == ["root", "vectorize", "l2"]
    a = torch.rand(2, 4, 4)
    a = a @ a.mT
    out = model.normalization(a)
    expected = model.normalization.steps["root"](a).flatten(1)
    assert torch.allclose(out, F.normalize(expected, dim=1))


def test_projection_has_its_own_learning_rate():
    cfg = _compose(
        [
            "backbone=small",
            "pooling=sum",
            "pooling.proj_dim=4",
            "pooling.proj_bn=true",
            "pooling.proj_lr_scale=0.5",
        ]
    )
    model = build_model(cfg, NUM_CLASSES)
    groups = {g["name"]: g for g in model.param_groups(lr=2.0, backbone_lr=None)}
    assert set(groups) == {"proj", "head"}
    assert groups["proj"]["lr"] == 1.0 and groups["head"]["lr"] == 2.0
    # conv weight + BN weight and bias
    assert len(groups["proj"]["params"]) == 3
    assert model.features(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    # The projection trains in the linear stage: it is not part of the backbone.
    assert {id(p) for p in groups["proj"]["params"]} <= {id(p) for p in model.head_parameters()}


# The heads docs/models.md pairs with the ViT-B/16 and ConvNeXt-B presets.
SUM_SQRT = ["pooling=sum", "normalization=sqrt_l2", "normalization.sqrt.method=eigh"]
DEMOCRATIC = ["pooling=democratic", "normalization=signsqrt_l2"]
TINY = {"vit_b16": "vit_tiny_patch16_224", "convnext_b": "convnext_atto"}


@pytest.mark.parametrize(
    ("backbone", "head", "size"),
    [
        ("vit_b16", SUM_SQRT, 32),
        ("vit_b16", DEMOCRATIC, 224),
        ("convnext_b", DEMOCRATIC, 32),
        ("convnext_b", SUM_SQRT, 224),
    ],
    ids=["vit-sqrt-32", "vit-democratic-224", "convnext-democratic-32", "convnext-sqrt-224"],
)
def test_modern_presets_train_from_random_weights(backbone, head, size, tmp_path):
    data = [f"dataset.image_size={size}", "dataset.trainval_size=20", "dataset.test_size=8"]
    # Both stages, one batch each: that the preset runs, not how well.
    short = [
        "trainer.linear.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_eval_batches=1",
    ]
    overrides = [f"backbone={backbone}", f"backbone.name={TINY[backbone]}", *head, *data, *short]
    results = train(compose_config(["debug=smoke", *overrides], tmp_path))
    assert (tmp_path / "results.json").exists() and 0 <= results["test_acc"] <= 100
    assert set(results["stages"]) == {"linear", "finetune"}


@pytest.mark.parametrize(
    ("backbone", "size", "grid", "gram"),
    [
        # ViT-B/16: 196 tokens < 768 channels at 224 (n x n route); 784 > 768 at 448.
        ("vit_b16", 224, 14, True),
        ("vit_b16", 448, 28, False),
        # ConvNeXt-B: 49 and 196 locations, both < 1024 channels.
        ("convnext_b", 224, 7, True),
        ("convnext_b", 448, 14, True),
    ],
)
def test_modern_presets_descriptors_and_routes(backbone, size, grid, gram):
    # The real (base-size) presets, planned without memory: what docs/models.md lists.
    cfg = compose_config([f"backbone={backbone}", *SUM_SQRT])
    planned = plan_model(cfg, size, 200, "dataset.transform.size")
    channels = {"vit_b16": 768, "convnext_b": 1024}[backbone]
    assert planned.map_shape == (channels, grid, grid)
    assert planned.descriptor.numel == channels**2
    step = instantiate(cfg.normalization).train().leading_matrix_step()
    assert (step.small_side(grid * grid, channels, "cpu") is not None) == gram
