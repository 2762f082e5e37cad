"""The published tables as specs: one row per result, as Hydra overrides plus a paper key.

A :class:`Table` lists :class:`Row` s. Each row says how to train the result (the
overrides of one ``train.py`` job, starting from an ``experiment=`` preset of
``configs/experiment/``) and where its published number is (a :class:`PaperKey` into
``bcnn/resources/paper_results.csv``). ``scripts/reproduce.py table=<name>`` launches one
job per row and compares.

The paper tables list only rows this code can train. The talk's tables
(``talk_<name>``, "Improving second-order representations") are laid out as on the
slides and keep every row: one that cannot run (another authors' method, a feature not
yet there) has a ``reason`` instead of a job, and the report leaves its cell empty with
that reason. A talk row may also carry the paper's key (``Row.paper``), printed where the
paper's number differs from the talk's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import NamedTuple

import pandas as pd

PAPER_RESULTS = "paper_results.csv"


class PaperKey(NamedTuple):
    """The identifying columns of one line of ``paper_results.csv``."""

    source: str
    table: str
    dataset: str
    method: str
    backbone: str
    setting: str


def slug(text: str) -> str:
    """Lower-case ``[a-z0-9_]`` version of ``text`` (for file and config names)."""
    text = text.lower().replace("+", "_plus_").replace("=", "_")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")


@cache
def paper_results() -> pd.DataFrame:
    """``bcnn/resources/paper_results.csv`` as a DataFrame (read once)."""
    with resources.files("bcnn").joinpath("resources", PAPER_RESULTS).open() as f:
        return pd.read_csv(f, dtype={c: str for c in PaperKey._fields})


def published(key: PaperKey | None) -> tuple[float | None, float | None]:
    """The published (top-1 accuracy, std) for ``key``; (None, None) if not listed.

    Raises:
        ValueError: ``key`` matches several lines (the CSV has a duplicate).
    """
    if key is None:
        return None, None
    df = paper_results()
    match = df
    for name, value in key._asdict().items():
        match = match[match[name] == value]
    if len(match) > 1:
        raise ValueError(f"{key} matches {len(match)} lines of {PAPER_RESULTS}")
    if match.empty:
        return None, None
    row = match.iloc[0]
    std = None if pd.isna(row["std"]) else float(row["std"])
    return float(row["top1"]), std


@dataclass(frozen=True)
class Row:
    """One published number and the job that reproduces it.

    Attributes:
        label: Row label as in the paper, e.g. ``"B-CNN [D,D]"``.
        columns: Column label(s) of the cell, e.g. ``("CUB", "ft")``.
        overrides: Hydra overrides of the job, e.g.
            ``("experiment=iccv15_t1_bcnn_dd", "dataset=cub")``. Group choices
            (``group=option``) and key assignments (``a.b=value``) only: no ``~``/``+``,
            no list indices (the launcher writes them into a config file).
        key: Where the published number is in ``paper_results.csv``; None if unpublished.
        paper: A second published number for the same cell (the paper behind a talk's
            table), shown where it differs from ``key``'s.
        reason: Why the row cannot run; such a row launches no job.
        benchmark: ``(method, iters)`` of a timing row: its value is the forward time of
            one 512x512 matrix square root read from the matrix-function benchmark
            results (``benchmarks/results/matrix_functions_<device>.csv``), not a job.
        splits: Overrides of the row's repeats, one job each (e.g. the ten DTD partitions
            ``dataset.partition=1`` ... ``=10``); the report gives their mean and standard
            deviation. Empty: one job.
    """

    label: str
    columns: tuple[str, ...]
    overrides: tuple[str, ...]
    key: PaperKey | None
    paper: PaperKey | None = None
    reason: str | None = None
    benchmark: tuple[str, int] | None = None
    splits: tuple[str, ...] = ()

    @property
    def runnable(self) -> bool:
        """Whether the row is trained (not a timing row, not waiting for a feature)."""
        return self.reason is None and self.benchmark is None

    @property
    def id(self) -> str:
        """Unique (within a table) name made of the label and columns."""
        return "__".join(slug(p) for p in (self.label, *self.columns))

    @property
    def job_ids(self) -> list[str]:
        """The job folder names: ``id``, or ``<id>__split<k>`` (k = 1, 2, ...) per split."""
        if not self.splits:
            return [self.id]
        return [f"{self.id}__split{k}" for k in range(1, len(self.splits) + 1)]

    @property
    def experiment(self) -> str | None:
        """The ``experiment=`` preset the row starts from, if any."""
        for o in self.overrides:
            if o.startswith("experiment="):
                return o.split("=", 1)[1]
        return None


@dataclass(frozen=True)
class Table:
    """A published table: its rows and how to lay the report out.

    Attributes:
        name: Spec name (``iccv15_table1``, ...).
        title: Paper and table, for the report.
        description: One line for ``reproduce.py list``.
        column_names: Names of the parts of ``Row.columns`` (e.g. ``("dataset", "setting")``).
        rows: The rows, in the paper's order.
        notes: Deviations from the paper's protocol worth printing under the report.
        reference: What ``Row.key`` points at, as the report's column header (``paper``,
            or ``talk`` for the talk's tables).
        second: Header of the ``Row.paper`` numbers.
    """

    name: str
    title: str
    description: str
    column_names: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    reference: str = "paper"
    second: str = "paper"

    def row(self, row_id: str) -> Row:
        """The row with ``Row.id == row_id``."""
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(f"table {self.name} has no row {row_id!r}")


# ---- datasets: label -> overrides ------------------------------------------------------
# CUB+box: the bounding box crops images at train and test time, as in ICCV 2015.
FINE_GRAINED = {
    "CUB": ("dataset=cub",),
    "CUB+box": ("dataset=cub", "dataset.bbox_crop=true"),
    "Aircraft": ("dataset=aircraft",),
    "Cars": ("dataset=cars",),
}
# No fine-tuning: the papers' one-vs-all linear SVMs (C = 1) on the frozen features of the
# training images and their mirror images (tsungyu/bcnn model_train.m); classifier=svm
# sets the stages too, but the recipe (after it in the defaults) would put fine-tuning back.
NF = ("trainer.stages=[linear]", "classifier=svm")
WEIGHTS = "${oc.env:BCNN_WEIGHTS,weights}"


def fccnn_weights(short: str, cell: str) -> str:
    """The fine-tuned FC-CNN checkpoint the FV-CNN "ft" cell starts from (see docs).

    Args:
        short: ``d`` (VGG-D) or ``m`` (VGG-M).
        cell: The dataset column label (``CUB``, ``CUB+box``, ``Aircraft``, ``Cars``).
    """
    return f"{WEIGHTS}/fccnn_vgg_{short}_ft_{slug(cell)}.pt"


def fvcnn_ft(short: str, cell: str) -> tuple[str, ...]:
    """Overrides of an FV-CNN "ft" cell: the Fisher vector of the conv features of the
    FC-CNN fine-tuned on the same cell ("indirect fine-tuning")."""
    pretrained = ("backbone.pretrained=false",) if short == "d" else ()
    return (*pretrained, f"backbone.weights={fccnn_weights(short, cell)}")


def _iccv15_table1() -> Table:
    source, table = "Lin et al. ICCV 2015", "Table 1"
    families = [  # label, experiment, method and backbone in paper_results.csv
        ("FC-CNN [M]", "iccv15_t1_fccnn_m", "FC-CNN", "VGG-M"),
        ("FC-CNN [D]", "iccv15_t1_fccnn_d", "FC-CNN", "VGG-D"),
        ("FV-CNN [M]", "iccv15_t1_fvcnn_m", "FV-CNN", "VGG-M"),
        ("FV-CNN [D]", "iccv15_t1_fvcnn_d", "FV-CNN", "VGG-D"),
        ("B-CNN [M,M]", "iccv15_t1_bcnn_mm", "B-CNN", "VGG-M+VGG-M"),
        ("B-CNN [D,M]", "iccv15_t1_bcnn_dm", "B-CNN", "VGG-D+VGG-M"),
        ("B-CNN [D,D]", "iccv15_t1_bcnn_dd", "B-CNN", "VGG-D+VGG-D"),
    ]
    rows = []
    for label, exp, method, backbone in families:
        for ds, ds_over in FINE_GRAINED.items():
            for setting in ("nf", "ft"):
                if method == "FV-CNN":  # the preset is nf; ft reads the fine-tuned FC-CNN
                    extra = fvcnn_ft(exp[-1], ds) if setting == "ft" else ()
                elif setting == "nf":  # FC-CNN: get_rcnn_features.m L2-normalizes fc7
                    extra = (*NF, "normalization=l2") if method == "FC-CNN" else NF
                else:
                    extra = ()
                rows.append(
                    Row(
                        label,
                        (ds, setting),
                        (f"experiment={exp}", *ds_over, *extra),
                        PaperKey(source, table, ds, method, backbone, setting),
                    )
                )
    return Table(
        "iccv15_table1",
        "Lin, RoyChowdhury & Maji, ICCV 2015, Table 1",
        "FC-CNN, FV-CNN and B-CNN [M,M], [D,M], [D,D] on CUB, CUB+box, Aircraft, Cars; nf "
        "and ft (56 rows)",
        ("dataset", "setting"),
        tuple(rows),
        (
            "nf = one-vs-all linear SVMs (C = 1) on the frozen features of the training "
            "images and their mirror images, test scores averaged over an image and its flip.",
            "FC-CNN: fc7 of the 224x224 network; ft fine-tunes it as the authors' "
            "imdb_cnn_train.m (no linear stage, softmax tested).",
            "FV-CNN ft: the Fisher vector of the conv features of the FC-CNN fine-tuned on "
            "the same cell (indirect fine-tuning): run the FC-CNN ft cells first and copy "
            "their checkpoints (docs/reproduce.md).",
            "ft rows test the fine-tuned softmax classifier (the paper: an SVM retrained on "
            "the fine-tuned features). FV-SIFT rows are not implemented.",
        ),
    )


BMVC17 = ("Lin & Maji BMVC 2017",)
VGG = {"VGG-M": ("m", "mm"), "VGG-D": ("d", "dd")}  # label -> (file suffix, B-CNN suffix)
BMVC_DATASETS = ("CUB", "Cars", "Aircraft")


def _bmvc17_table1() -> Table:
    norms = [  # label in the paper, experiment file stem (None: plain B-CNN)
        ("sgnsqrt", None),
        ("logA", "log"),
        ("sqrtA", "sqrt"),
        ("logA+sgnsqrt", "log_signsqrt"),
        ("sqrtA+sgnsqrt", "sqrt_signsqrt"),
    ]
    rows = []
    for label, stem in norms:
        for backbone, (short, pair) in VGG.items():
            exp = f"iccv15_t1_bcnn_{pair}" if stem is None else f"bmvc17_t1_vgg_{short}_{stem}"
            extra = NF if stem is None else ()  # the bmvc17_t1 files are nf already
            for ds in BMVC_DATASETS:
                rows.append(
                    Row(
                        label,
                        (backbone, ds),
                        (f"experiment={exp}", *FINE_GRAINED[ds], *extra),
                        PaperKey(*BMVC17, "Table 1", ds, label, backbone, "nf"),
                    )
                )
    return Table(
        "bmvc17_table1",
        "Lin & Maji, BMVC 2017, Table 1",
        "normalization ablation (sgnsqrt, logA, sqrtA and with sgnsqrt) without fine-tuning, "
        "VGG-M and VGG-D on CUB, Cars, Aircraft (30 rows)",
        ("backbone", "dataset"),
        tuple(rows),
        (
            "Matrix functions are exact (SVD for sqrtA, eigendecomposition for logA).",
            "One-vs-all linear SVMs (C = 1) on the frozen features of the training images and "
            "their mirror images, flip-averaged test scores.",
        ),
    )


def _bmvc17_table2() -> Table:
    rows = []
    families = (  # label, method in paper_results.csv, experiment per backbone
        ("B-CNN", "B-CNN(sgnsqrt)", "iccv15_t1_bcnn_{pair}"),
        ("Improved B-CNN", "ImprovedB-CNN(sqrtA+sgnsqrt)", "bmvc17_t2_improved_vgg_{short}"),
    )
    for label, method, pattern in families:
        for backbone, (short, pair) in VGG.items():
            exp = pattern.format(short=short, pair=pair)
            for ds in BMVC_DATASETS:
                rows.append(
                    Row(
                        label,
                        (backbone, ds),
                        (f"experiment={exp}", *FINE_GRAINED[ds]),
                        PaperKey(*BMVC17, "Table 2", ds, method, backbone, "ft"),
                    )
                )
    return Table(
        "bmvc17_table2",
        "Lin & Maji, BMVC 2017, Table 2",
        "B-CNN vs Improved B-CNN (matrix sqrt, 5 Newton-Schulz iterations) after "
        "fine-tuning, VGG-M and VGG-D on CUB, Cars, Aircraft (12 rows)",
        ("backbone", "dataset"),
        tuple(rows),
    )


def _bmvc17_table3() -> Table:
    families = [  # label, experiment, method in paper_results.csv, setting
        ("Newton-Schulz, 0 iterations", "bmvc17_t3_ns0", "NS-0iter", "nf"),
        ("Newton-Schulz, 1 iteration", "bmvc17_t3_ns1", "NS-1iter", "nf"),
        ("Newton-Schulz, 5 iterations", "bmvc17_t3_ns5", "NS-5iter", "nf"),
        ("Newton-Schulz, 10 iterations", "bmvc17_t3_ns10", "NS-10iter", "nf"),
        ("Newton-Schulz, 20 iterations", "bmvc17_t3_ns20", "NS-20iter", "nf"),
        ("SVD", "bmvc17_t1_vgg_d_sqrt_signsqrt", "SVD", "nf"),
        ("ft, gradient: Lyapunov", "bmvc17_t2_improved_vgg_d", "ft-grad-LYAP", "ft"),
        ("ft, gradient: SVD", "bmvc17_t3_ft_grad_svd", "ft-grad-SVD", "ft"),
        (
            "ft, gradient: none (faster)",
            "bmvc17_t3_ft_grad_ignore",
            "ft-ignore-sqrt(Faster)",
            "ft",
        ),
    ]
    rows = [
        Row(
            label,
            (ds,),
            (f"experiment={exp}", *FINE_GRAINED[ds]),
            PaperKey(*BMVC17, "Table 3", ds, method, "VGG-D", setting),
        )
        for label, exp, method, setting in families
        for ds in BMVC_DATASETS
    ]
    return Table(
        "bmvc17_table3",
        "Lin & Maji, BMVC 2017, Table 3",
        "matrix sqrt by Newton-Schulz (0/1/5/10/20 iterations) vs SVD without fine-tuning, "
        "and the gradient (Lyapunov, SVD, none) when fine-tuning, VGG-D (27 rows)",
        ("dataset",),
        tuple(rows),
    )


# Other authors' methods: reported, never trained here.
OTHERS = "another authors' method: not implemented"


def _bmvc17_table4() -> Table:
    families = [  # label, experiment (None: another authors' method), method, backbone
        ("B-CNN (VGG-M)", "iccv15_t1_bcnn_mm", "B-CNN", "VGG-M"),
        ("B-CNN (VGG-D)", "iccv15_t1_bcnn_dd", "B-CNN", "VGG-D"),
        ("B-CNN (VGG-M + VGG-D)", "iccv15_t1_bcnn_dm", "B-CNN", "VGG-M+VGG-D"),
        ("Improved B-CNN (VGG-M)", "bmvc17_t2_improved_vgg_m", "ImprovedB-CNN", "VGG-M"),
        ("Improved B-CNN (VGG-D)", "bmvc17_t2_improved_vgg_d", "ImprovedB-CNN", "VGG-D"),
        ("CBP, Tensor Sketch 8192 (VGG-D)", "bmvc17_t4_cbp", "CBP(TS-8192)", "VGG-D"),
        ("LRBP (VGG-D)", "bmvc17_t4_lrbp", "LRBP", "VGG-D"),
        ("Kernel Pooling (VGG-D)", None, "KernelPooling", "VGG-D"),
        ("BoostCNN (B-CNN)", None, "BoostCNN", "B-CNN"),
        ("STN (Inception-BN)", None, "STN", "Inception-BN"),
        ("Krause et al., box at training (VGG-D)", None, "Krause(box-train)", "VGG-D"),
        ("PD+SWFV-CNN (VGG-D)", None, "PD+SWFV-CNN", "VGG-D"),
        ("PD+FC+SWFV-CNN (VGG-D)", None, "PD+FC+SWFV-CNN", "VGG-D"),
    ]
    rows = []
    for label, exp, method, backbone in families:
        for ds in BMVC_DATASETS:
            key = PaperKey(*BMVC17, "Table 4", ds, method, backbone, "ft")
            if published(key)[0] is None:
                continue  # a "-" in the paper
            if exp is None:
                rows.append(Row(label, (ds,), (), key, reason=OTHERS))
            else:
                rows.append(Row(label, (ds,), (f"experiment={exp}", *FINE_GRAINED[ds]), key))
    return Table(
        "bmvc17_table4",
        "Lin & Maji, BMVC 2017, Table 4",
        "fine-tuned B-CNN and Improved B-CNN beside compact (Tensor Sketch 8192) and "
        "low-rank bilinear pooling and other published methods, on CUB, Cars, Aircraft "
        "(30 cells)",
        ("dataset",),
        tuple(rows),
        (
            "CBP and LRBP are the other authors' models (Gao et al., CVPR 2016; Kong & "
            "Fowlkes, CVPR 2017) trained here with the B-CNN rows' MATLAB recipe (LRBP at "
            "lr 0.1: 1.0 diverges with its quadratic classifier); LRBP's 1x1 projection "
            "starts from a random initialization (the authors: PCA), see docs/protocols.md.",
            "B-CNN and Improved B-CNN: the same presets (and runs) as bmvc17_table2; the "
            "B-CNN Aircraft cells are BMVC 2017's (VGG-M 81.3, VGG-D 86.9; ICCV 2015: 77.9, "
            "84.1).",
        ),
    )


ECCV18 = "Lin, Maji & Koniusz ECCV 2018"
# label -> (file suffix, dataset name in paper_results.csv, published gamma, published p,
# initial network in paper_results.csv). Fine-grained rows start from a B-CNN VGG-16
# fine-tuned on the same dataset, texture and scene rows from ImageNet VGG-16.
ECCV18_DATASETS = {
    "CUB": ("cub", "CUB", 0.5, 0.3, "VGG-16(BCNN-ft)"),
    "Cars": ("cars", "Cars", 0.5, 0.5, "VGG-16(BCNN-ft)"),
    "Aircraft": ("aircraft", "Aircraft", 0.0, 0.3, "VGG-16(BCNN-ft)"),
    "DTD": ("dtd", "DTD(split1)", 0.3, 0.6, "VGG-16(ImageNet)"),
    "FMD": ("fmd", "FMD", 0.8, 0.7, "VGG-16(ImageNet)"),
    "MIT Indoor": ("mit", "MIT", 0.3, 0.6, "VGG-16(ImageNet)"),
}


def _g(value: float) -> str:
    """Formats gamma/p as in paper_results.csv (0 -> "0.0", 1 -> "1")."""
    return f"{value:.1f}"


def _eccv18_table1() -> Table:
    rows = []
    for label in ("democratic", "gamma-democratic", "sum", "matrix power"):
        for ds, (suffix, name, gamma, p, init) in ECCV18_DATASETS.items():
            demo = f"experiment=eccv18_t1_gdemocratic_{suffix}"
            if label == "democratic":  # gamma = 0: every feature contributes equally
                over, method = (demo, "pooling.gamma=0.0"), "democratic(g=0)"
            elif label == "gamma-democratic":
                over, method = (demo,), f"g-democratic(g={_g(gamma)})"
            elif label == "sum":  # gamma = 1 is sum pooling (the B-CNN descriptor)
                over, method = (demo, "pooling.gamma=1.0"), "sum(g=1)"
            else:
                over, method = (f"experiment=eccv18_t1_mpow_{suffix}",), f"matrix-power(p={p})"
            rows.append(
                Row(label, (ds,), over, PaperKey(ECCV18, "Table 1", name, method, init, "svm"))
            )
    return Table(
        "eccv18_table1",
        "Lin, Maji & Koniusz, ECCV 2018, Table 1",
        "sum vs (gamma-)democratic aggregation vs matrix power with the published gamma "
        "and p, VGG-16, on CUB, Cars, Aircraft, DTD, FMD, MIT Indoor (24 rows)",
        ("dataset",),
        tuple(rows),
        (
            "One-vs-all linear SVMs (C = 1) on the frozen features of train+val and their "
            "mirror images, flip-averaged test scores.",
            "Fine-grained rows need the B-CNN VGG-16 fine-tuned on the same dataset as "
            "backbone weights (see docs/reproduce.md).",
            "DTD: split 1; FMD: trial 1 (the paper's protocol for FMD averages splits).",
        ),
    )


# ECCV 2018 Tables 2-5 (ResNet-101): column label -> (dataset overrides, dataset name in
# paper_results.csv, the overrides of the repeats: DTD's ten official partitions, FMD's ten
# random train/test trials (o2dp run_experiments_sketcho2dp_resnet.m: splits = 10), MIT one).
ECCV18_TEXTURES = {
    "DTD": (("dataset=dtd",), "DTD", tuple(f"dataset.partition={k}" for k in range(1, 11))),
    "FMD": (("dataset=fmd",), "FMD", tuple(f"dataset.trial={k}" for k in range(1, 11))),
    "MIT Indoor": (("dataset=mit_indoor",), "MIT", ()),
}


def _eccv18_tables2_5() -> Table:
    demo = "eccv18_t25_resnet101_ts_gdemocratic"
    first = "eccv18_t25_resnet101_first_order_gdemocratic"
    families = [  # label, experiment (None: not implemented), extra, method, input
        ("TS + sum", "eccv18_t25_resnet101_ts_sum", (), "TS+sum", "448"),
        ("TS + gamma-democratic", demo, (), "TS+g-democratic", "448"),
        (
            "TS + gamma-democratic, 224x224",
            demo,
            ("dataset.transform.size=224",),
            "TS+g-democratic",
            "224",
        ),
        ("first-order gamma-democratic", first, (), "first-order-g-democratic", "448"),
    ]
    rows = []
    for label, exp, extra, method, size in families:
        for column, (ds_over, name, splits) in ECCV18_TEXTURES.items():
            key = PaperKey(ECCV18, "Tables 2-5", name, method, "ResNet-101", f"input {size}")
            if published(key)[0] is None:
                continue
            over = (f"experiment={exp}", *ds_over, *extra)
            rows.append(Row(label, (column,), over, key, splits=splits))
    return Table(
        "eccv18_tables2_5",
        "Lin, Maji & Koniusz, ECCV 2018, Tables 2-5 (ResNet-101)",
        "second-order sum and gamma-democratic aggregation of ImageNet ResNet-101 features "
        "in an 8192-dimensional Tensor Sketch space, and first-order gamma-democratic, on "
        "DTD and FMD (mean and standard deviation over 10 splits) and MIT Indoor (11 cells, "
        "83 jobs)",
        ("dataset",),
        tuple(rows),
        (
            "ResNet-101 through timm (resnet101.tv_in1k, the torchvision weights; the "
            "paper: MatConvNet's imagenet-resnet-101-dag, the original Caffe model), last "
            "stage (res5c, 2048 channels), 448x448 unless the row says 224.",
            "One-vs-all linear SVMs (C = 1) on the frozen descriptors of train+val and their "
            "mirror images, flip-averaged test scores. gamma = 0.5 for every dataset (the "
            "script's default; the paper's per-dataset choice for these rows is not in the "
            "sources read).",
            "First-order gamma-democratic: the same Sinkhorn settings on the linear kernel of "
            "the 2048-dimensional features, then signed square root and L2 as the "
            "second-order rows (assumed: the authors' code has no first-order script).",
            "DTD: the mean and sample standard deviation over partitions 1-10; FMD over ten "
            "seeded 50/50 trials (not the authors' random splits); MIT Indoor: one split.",
        ),
    )


TALK = "seed talk slides"
BMVC4 = ("Lin & Maji BMVC 2017", "Table 4")
ICCV15 = ("Lin et al. ICCV 2015", "Table 1")
SLIDE_DATASETS = (("Birds", "CUB"), ("Cars", "Cars"), ("Aircraft", "Aircraft"))
DS_OVERRIDES = {
    "CUB": ("dataset=cub",),
    "Cars": ("dataset=cars",),
    "Aircraft": ("dataset=aircraft",),
}


def _talk_key(table: str, dataset: str, method: str, backbone: str, setting: str) -> PaperKey:
    return PaperKey(TALK, table, dataset, method, backbone, setting)


# The talk's fine-grained slide: label, experiment (None: not runnable), the talk's
# method/backbone, ICCV 2015's method/backbone.
_FINE_GRAINED_FAMILIES = (
    ("FC [D]", "iccv15_t1_fccnn_d", ("FC", "VGG-D"), ("FC-CNN", "VGG-D")),
    ("FV [D]", "iccv15_t1_fvcnn_d", ("FV", "VGG-D"), ("FV-CNN", "VGG-D")),
    ("Bilinear [D+D]", "iccv15_t1_bcnn_dd", ("Bilinear", "VGG-D+VGG-D"), ("B-CNN", "VGG-D+VGG-D")),
    ("Bilinear [D+M]", "iccv15_t1_bcnn_dm", ("Bilinear", "VGG-M+VGG-D"), ("B-CNN", "VGG-D+VGG-M")),
    ("Previous work", None, ("previous work", "-"), None),
)


def _talk_fine_grained() -> Table:
    table = "Talk: fine-grained classification (VGG-D + VGG-M)"
    order = (("Birds", "CUB"), ("Aircraft", "Aircraft"), ("Cars", "Cars"))  # slide order
    rows = []
    for label, exp, (method, backbone), paper in _FINE_GRAINED_FAMILIES:
        for column, ds in order:
            setting = "-" if paper is None else "ft"
            key = _talk_key(table, ds, method, backbone, setting)
            other = PaperKey(*ICCV15, ds, *paper, "ft") if paper else None
            if exp is None:
                reason = OTHERS + " (STN; Gosselin et al.; Krause et al.)"
                rows.append(Row(label, (column,), (), key, other, reason=reason))
                continue
            # FV [D] "ft": the Fisher vector of the fine-tuned FC-CNN's conv features.
            extra = fvcnn_ft("d", ds) if exp == "iccv15_t1_fvcnn_d" else ()
            over = (f"experiment={exp}", *DS_OVERRIDES[ds], *extra)
            rows.append(Row(label, (column,), over, key, other))
    return Table(
        "talk_fine_grained",
        "Talk: fine-grained classification (VGG-D + VGG-M networks)",
        "the talk's first results slide: FC [D], FV [D], B-CNN [D+D] and [D+M], fine-tuned, "
        "on Birds, Aircraft, Cars (15 cells)",
        ("dataset",),
        tuple(rows),
        (
            "FC [D]: fc7 of VGG-16 at 224x224, fine-tuned as the authors' imdb_cnn_train.m. "
            "FV [D]: the Fisher vector (64 components) of relu5_3 at 448x448 of that "
            "fine-tuned network, one-vs-all SVMs: run the FC [D] rows first and copy their "
            "checkpoints to $BCNN_WEIGHTS/fccnn_vgg_d_ft_<cub|aircraft|cars>.pt "
            "(docs/reproduce.md).",
            "Published numbers: the talk's; the paper column shows ICCV 2015 Table 1 where it "
            "prints another number (Aircraft).",
        ),
        reference="talk",
    )


def _talk_nabirds() -> Table:
    table = "NABirds"
    return Table(
        "talk_nabirds",
        "Talk: NABirds (48,562 images, 555 categories)",
        "B-CNN [D+M] fine-tuned on NABirds vs the prior Inception-BN result (2 cells)",
        ("dataset",),
        (
            Row(
                "Inception-BN",
                ("NABirds",),
                (),
                _talk_key(table, "NABirds", "Inception-BN (prior work)", "Inception-BN", "ft"),
                reason=OTHERS + " (Szegedy et al.)",
            ),
            Row(
                "B-CNN [D+M]",
                ("NABirds",),
                ("experiment=nabirds_bcnn_dm", "dataset=nabirds"),
                _talk_key(table, "NABirds", "B-CNN", "VGG-D+VGG-M", "ft"),
            ),
        ),
        reference="talk",
    )


def _talk_normalization() -> Table:
    table = "Talk: relative effects of different normalizations (VGG-D, L2 at the end)"
    norms = [  # label, experiment (None: plain B-CNN, nf)
        ("sgnsqrt", None),
        ("logA", "bmvc17_t1_vgg_d_log"),
        ("sqrtA", "bmvc17_t1_vgg_d_sqrt"),
        ("logA+sgnsqrt", "bmvc17_t1_vgg_d_log_signsqrt"),
        ("sqrtA+sgnsqrt", "bmvc17_t1_vgg_d_sqrt_signsqrt"),
    ]
    rows = []
    for label, exp in norms:
        for column, ds in SLIDE_DATASETS:
            over = (f"experiment={exp}",) if exp else ("experiment=iccv15_t1_bcnn_dd", *NF)
            rows.append(
                Row(
                    label,
                    (column,),
                    (*over, *DS_OVERRIDES[ds]),
                    _talk_key(table, ds, label, "VGG-D", "nf"),
                    PaperKey(*BMVC17, "Table 1", ds, label, "VGG-D", "nf"),
                )
            )
    return Table(
        "talk_normalization",
        "Talk: relative effects of different normalizations (VGG-D, L2 at the end)",
        "sgnsqrt, logA, sqrtA and with sgnsqrt, VGG-D without fine-tuning, on Birds, Cars, "
        "Aircraft (15 cells)",
        ("dataset",),
        tuple(rows),
        (
            "The slide's header reads Birds | Aircrafts | Cars but its values are Birds | Cars "
            "| Aircraft (the same cells as BMVC 2017 Table 1): the columns here follow the "
            "values.",
        ),
        reference="talk",
    )


NS_ITERATIONS = (0, 1, 5, 10, 20)


def _talk_newton_schulz() -> Table:
    table = "Talk: matrix square root by Newton-Schulz iterations (VGG-D, no fine-tuning)"
    rows = []
    columns = [
        (str(k), f"bmvc17_t3_ns{k}", f"NS-{k}iter", ("newton_schulz", k)) for k in NS_ITERATIONS
    ]
    columns.append(("SVD", "bmvc17_t1_vgg_d_sqrt_signsqrt", "SVD", ("svd", 0)))
    for label, ds in SLIDE_DATASETS:
        for column, exp, method, _ in columns:
            rows.append(
                Row(
                    label,
                    (column,),
                    (f"experiment={exp}", *DS_OVERRIDES[ds]),
                    _talk_key(table, ds, method, "VGG-D", "nf"),
                    PaperKey(*BMVC17, "Table 3", ds, method, "VGG-D", "nf"),
                )
            )
    for column, _, method, bench in columns:
        rows.append(
            Row(
                "Time (ms)",
                (column,),
                (),
                _talk_key(table, "time (ms, 512x512)", method, "-", "-"),
                benchmark=bench,
            )
        )
    return Table(
        "talk_newton_schulz",
        "Talk: matrix square root by Newton-Schulz iterations (VGG-D, no fine-tuning)",
        "Newton-Schulz with 0/1/5/10/20 iterations vs SVD on Birds, Cars, Aircraft, and the "
        "forward time of one 512x512 root (18 cells + 6 timings)",
        ("iterations",),
        tuple(rows),
        (
            "Time (ms): the talk's row is one 512x512 matrix on a GPU (MATLAB); ours is the "
            "forward median of `bcnn.ops.sqrtm` at d = 512, batch 1, float32 from the "
            "matrix-function benchmark results of the machine the report is made on "
            "(scripts/bench_matrix_functions.py).",
        ),
        reference="talk",
    )


def _talk_gradients() -> Table:
    table = "Talk: SVD vs Lyapunov gradients (VGG-D, fine-tuned)"
    families = [  # label, experiment, talk method, BMVC 2017 (table, method)
        ("sgnsqrt (B-CNN)", "iccv15_t1_bcnn_dd", "B-CNN (sgnsqrt)", ("Table 2", "B-CNN(sgnsqrt)")),
        (
            "Lyapunov: A^1/2 + sgnsqrt",
            "bmvc17_t2_improved_vgg_d",
            "Lyapunov gradient (sqrtA+sgnsqrt)",
            ("Table 3", "ft-grad-LYAP"),
        ),
        (
            "SVD: A^1/2 + sgnsqrt",
            "bmvc17_t3_ft_grad_svd",
            "SVD gradient (sqrtA+sgnsqrt)",
            ("Table 3", "ft-grad-SVD"),
        ),
    ]
    rows = [
        Row(
            label,
            (column,),
            (f"experiment={exp}", *DS_OVERRIDES[ds]),
            _talk_key(table, ds, method, "VGG-D", "ft"),
            PaperKey(*BMVC17, paper[0], ds, paper[1], "VGG-D", "ft"),
        )
        for label, exp, method, paper in families
        for column, ds in SLIDE_DATASETS
    ]
    return Table(
        "talk_gradients",
        "Talk: SVD vs Lyapunov gradients (VGG-D, fine-tuned)",
        "B-CNN vs Improved B-CNN fine-tuned with the Lyapunov or the SVD gradient of the "
        "square root, on Birds, Cars, Aircraft (9 cells)",
        ("dataset",),
        tuple(rows),
        (
            "Fine-tuning computes the root exactly (SVD) with the named gradient; the features "
            "that are tested use five Newton-Schulz iterations (tsungyu/bcnn).",
        ),
        reference="talk",
    )


def _talk_spectral() -> Table:
    table = "Talk: accuracy with spectral normalization layers"
    families = [  # label, backbone (talk), experiment or reason, BMVC 2017 Table 4 method
        ("B-CNN [PAMI 16]", "VGG-D", "iccv15_t1_bcnn_dd", ("B-CNN", "VGG-D")),
        (
            "Improved B-CNN [BMVC 17]",
            "VGG-D",
            "bmvc17_t2_improved_vgg_d",
            ("ImprovedB-CNN", "VGG-D"),
        ),
        ("CBP [CVPR 16]", "VGG-D", "bmvc17_t4_cbp", ("CBP(TS-8192)", "VGG-D")),
        ("LRBP [CVPR 17]", "VGG-D", "bmvc17_t4_lrbp", ("LRBP", "VGG-D")),
        ("BoostCNN [BMVC 16]", "B-CNN", OTHERS, ("BoostCNN", "B-CNN")),
        ("Kernel Pooling [CVPR 17]", "VGG-D", OTHERS, ("KernelPooling", "VGG-D")),
        ("STN [NIPS 15]", "Inception-BN", OTHERS, ("STN", "Inception-BN")),
        ("Krause et al. [CVPR 15]", "VGG-D + box", OTHERS, ("Krause(box-train)", "VGG-D")),
    ]
    rows = []
    for label, backbone, exp, paper in families:
        for column, ds in SLIDE_DATASETS:
            key = _talk_key(table, ds, label, backbone, "ft")
            if published(key)[0] is None:
                continue  # a "-" on the slide
            other = PaperKey(*BMVC4, ds, paper[0], paper[1], "ft")
            if exp.startswith(("iccv15", "bmvc17")):
                rows.append(
                    Row(label, (column,), (f"experiment={exp}", *DS_OVERRIDES[ds]), key, other)
                )
            else:
                rows.append(Row(label, (column,), (), key, other, reason=exp))
    return Table(
        "talk_spectral",
        "Talk: accuracy with spectral normalization layers",
        "B-CNN and Improved B-CNN (VGG-D, fine-tuned) beside CBP, LRBP and other published "
        "methods, on Birds, Cars, Aircraft (18 cells)",
        ("dataset",),
        tuple(rows),
        (
            "The paper column: BMVC 2017 Table 4, where it prints another number (LRBP Aircraft).",
            "CBP and LRBP: as in bmvc17_table4 (the B-CNN MATLAB recipe; LRBP's projection "
            "starts from a random initialization, the authors': PCA).",
        ),
        reference="talk",
    )


# Slide label -> (dataset label in paper_results.csv, experiment suffix, ECCV 2018 name,
# published gamma, published p, initial network in paper_results.csv).
DEMOCRATIC_ROWS = (
    ("Caltech UCSD Birds", "CUB", "cub", "CUB", 0.5, 0.3, "VGG-16(BCNN-ft)"),
    ("Stanford Cars", "Cars", "cars", "Cars", 0.5, 0.5, "VGG-16(BCNN-ft)"),
    ("FGVC Aircrafts", "Aircraft", "aircraft", "Aircraft", 0.0, 0.3, "VGG-16(BCNN-ft)"),
    ("DTD", "DTD", "dtd", "DTD(split1)", 0.3, 0.6, "VGG-16(ImageNet)"),
    ("FMD", "FMD", "fmd", "FMD", 0.8, 0.7, "VGG-16(ImageNet)"),
    ("MIT Indoor", "MIT", "mit", "MIT", 0.3, 0.6, "VGG-16(ImageNet)"),
)


def _talk_democratic() -> Table:
    table = "Talk: democratic vs spectral (second-order democratic aggregation)"
    rows = []
    for label, ds, suffix, name, gamma, p, init in DEMOCRATIC_ROWS:
        demo = f"experiment=eccv18_t1_gdemocratic_{suffix}"
        cells = (
            ("Sum", "sum", (demo, "pooling.gamma=1.0"), "sum(g=1)"),
            ("Democratic", "democratic", (demo,), f"g-democratic(g={_g(gamma)})"),
            (
                "Spectral",
                "spectral",
                (f"experiment=eccv18_t1_mpow_{suffix}",),
                f"matrix-power(p={p})",
            ),
        )
        for column, method, over, paper in cells:
            rows.append(
                Row(
                    label,
                    (column,),
                    over,
                    _talk_key(table, ds, method, "VGG-D", "svm"),
                    PaperKey(ECCV18, "Table 1", name, paper, init, "svm"),
                )
            )
    return Table(
        "talk_democratic",
        "Talk: democratic vs spectral (second-order democratic aggregation)",
        "sum, gamma-democratic (the published gamma) and spectral (matrix power, the "
        "published p) aggregation of VGG-16 features, on six datasets (18 cells)",
        ("method",),
        tuple(rows),
        (
            "Democratic: the gamma-democratic rows of ECCV 2018 Table 1 (published gamma); "
            "Spectral: its matrix power (published p).",
            "One-vs-all linear SVMs (C = 1) on frozen features of train+val and their mirror "
            "images, flip-averaged test scores. Fine-grained rows start from the B-CNN [D,D] "
            "fine-tuned on the same dataset (docs/reproduce.md).",
            "The paper column: ECCV 2018 Table 1 where it prints another number (FMD).",
        ),
        reference="talk",
    )


# Slide order: (label, dataset label in paper_results.csv, overrides, training images).
INAT_SUPERCATEGORIES = (
    ("Plantae", 118800),
    ("Animalia", 5966),
    ("Reptilia", 22754),
    ("Amphibia", 11156),
    ("Aves", 143950),
    ("Mollusca", 8007),
    ("Fungi", 6864),
    ("Mammalia", 20104),
    ("Arachnida", 4037),
    ("Insecta", 87192),
    ("Actinopterygii", 7835),
)


def plateau_patience(train_images: int, rounds: int = 10) -> int:
    """train_cnn.py's ReduceLROnPlateau patience, in epochs.

    train_cnn.py validates every ``max(10000, N // 5)`` images and steps the schedule then,
    with the default patience of 10 validation rounds; this trainer steps once per epoch.

    Args:
        train_images: N, the supercategory's training images (the slides' counts).
        rounds: The patience in validation rounds.

    Returns:
        ``round(rounds * max(10000, N // 5) / N)``, at least 1.
    """
    return max(1, round(rounds * max(10000, train_images // 5) / train_images))


def _densenet_cells() -> list[tuple[str, str, tuple[str, ...], int | None]]:
    cells = [
        ("FGVC Aircrafts", "FGVC-Aircraft", ("dataset=aircraft",), None),
        ("Stanford Cars", "Stanford Cars", ("dataset=cars",), None),
        ("CU Birds", "CUB", ("dataset=cub",), None),
    ]
    for sc, n in INAT_SUPERCATEGORIES:
        over = ("dataset=inat", "dataset.version=2018", f"dataset.supercategory={sc}")
        cells.append((f"iNat {sc}", f"iNat2018 {sc}", over, n))
    order = [
        "FGVC Aircrafts", "iNat Plantae", "iNat Animalia", "Stanford Cars", "iNat Reptilia",
        "iNat Amphibia", "iNat Aves", "iNat Mollusca", "iNat Fungi", "iNat Mammalia",
        "iNat Arachnida", "iNat Insecta", "CU Birds", "iNat Actinopterygii",
    ]  # fmt: skip
    return sorted(cells, key=lambda c: order.index(c[0]))


README = ("cvl-umass/bilinear-cnn README (PyTorch)", "public reproduction")


_README_NAMES = {"FGVC-Aircraft": "Aircraft", "Stanford Cars": "Cars", "CUB": "CUB"}


def _densenet_job(column: str, over: tuple[str, ...], n: int | None) -> tuple[str, ...]:
    """The overrides of one DenseNet cell: first-order (plateau on iNat) or bilinear."""
    if not column.endswith("(regular)"):
        return ("experiment=densenet_inat_bilinear", *over)
    if n is None:
        return ("experiment=densenet_inat_first_order", *over)
    patience = f"trainer.finetune.scheduler.patience={plateau_patience(n)}"
    return ("experiment=densenet_inat_first_order_plateau", *over, patience)


def _talk_densenet() -> Table:
    table = "DenseNet-201 regular vs bilinear"
    rows = []
    for label, name, over, n in _densenet_cells():
        for column, method in (
            ("DenseNet (regular)", "first-order (regular)"),
            ("DenseNet (bilinear)", "bilinear"),
        ):
            other = None
            if column.endswith("(bilinear)") and name in _README_NAMES:
                bilinear = "Improved B-CNN (NS 5; 1x1 proj 128)"
                other = PaperKey(*README, _README_NAMES[name], bilinear, "DenseNet-201", "ft")
            key = _talk_key(table, name, method, "DenseNet-201", "ft")
            rows.append(Row(label, (column,), _densenet_job(column, over, n), key, other))
    return Table(
        "talk_densenet",
        "Talk: using DenseNet-201 (regular vs bilinear)",
        "DenseNet-201 average pooling vs Improved B-CNN (1x1 conv to 128, matrix sqrt), "
        "fine-tuned, on 11 iNat 2018 supercategories, CUB, Cars, Aircraft (28 cells)",
        ("model",),
        tuple(rows),
        (
            "Regular: train_cnn.py's recipe (fine-tuned from the start; ReduceLROnPlateau on "
            "iNat, its patience converted to epochs per supercategory, stepped on 10% of train "
            "held out); bilinear: train.py's (cvl-umass/bilinear-cnn).",
            "The README column: the bilinear model as the authors' PyTorch README reports it "
            "(CUB 87.5 against the talk's 88.3).",
        ),
        reference="talk",
        second="README",
    )


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        _iccv15_table1(),
        _bmvc17_table1(),
        _bmvc17_table2(),
        _bmvc17_table3(),
        _bmvc17_table4(),
        _eccv18_table1(),
        _eccv18_tables2_5(),
        _talk_fine_grained(),
        _talk_normalization(),
        _talk_newton_schulz(),
        _talk_gradients(),
        _talk_spectral(),
        _talk_democratic(),
        _talk_densenet(),
        _talk_nabirds(),
    )
}


def get_table(name: str) -> Table:
    """The table spec called ``name``.

    Raises:
        KeyError: naming the known tables.
    """
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; choose one of {sorted(TABLES)}")
    return TABLES[name]


def experiments_of(tables: Iterable[Table]) -> list[str]:
    """The distinct ``experiment=`` presets the rows of ``tables`` use, sorted."""
    return sorted({r.experiment for t in tables for r in t.rows if r.experiment})


def runnable_rows(table: Table) -> list[Row]:
    """The rows of ``table`` that launch a job."""
    return [r for r in table.rows if r.runnable]


__all__: Sequence[str] = [
    "TABLES",
    "PaperKey",
    "Row",
    "Table",
    "experiments_of",
    "get_table",
    "paper_results",
    "plateau_patience",
    "published",
    "runnable_rows",
]
