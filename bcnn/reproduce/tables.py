"""The published tables as specs: one row per result, as Hydra overrides plus a paper key.

A :class:`Table` lists :class:`Row` s. Each row says how to train the result (the
overrides of one ``train.py`` job, starting from an ``experiment=`` preset of
``configs/experiment/``) and where its published number is (a :class:`PaperKey` into
``bcnn/resources/paper_results.csv``). ``scripts/reproduce.py table=<name>`` launches one
job per row and compares.

Only rows this code can train are listed: the hand-crafted baselines of the papers
(FV-SIFT, FV-CNN) and other authors' methods are not.
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
    """

    label: str
    columns: tuple[str, ...]
    overrides: tuple[str, ...]
    key: PaperKey | None

    @property
    def id(self) -> str:
        """Unique (within a table) name made of the label and columns."""
        return "__".join(slug(p) for p in (self.label, *self.columns))

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
    """

    name: str
    title: str
    description: str
    column_names: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

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
NF = ("trainer.stages=[linear]",)  # no fine-tuning: the linear stage on frozen features


def _iccv15_table1() -> Table:
    source, table = "Lin et al. ICCV 2015", "Table 1"
    families = [  # label, experiment, method and backbone in paper_results.csv
        ("FC-CNN [M]", "iccv15_t1_fccnn_m", "FC-CNN", "VGG-M"),
        ("FC-CNN [D]", "iccv15_t1_fccnn_d", "FC-CNN", "VGG-D"),
        ("B-CNN [M,M]", "iccv15_t1_bcnn_mm", "B-CNN", "VGG-M+VGG-M"),
        ("B-CNN [D,M]", "iccv15_t1_bcnn_dm", "B-CNN", "VGG-D+VGG-M"),
        ("B-CNN [D,D]", "iccv15_t1_bcnn_dd", "B-CNN", "VGG-D+VGG-D"),
    ]
    rows = []
    for label, exp, method, backbone in families:
        for ds, ds_over in FINE_GRAINED.items():
            for setting, extra in (("nf", NF), ("ft", ())):
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
        "B-CNN [M,M], [D,M], [D,D] vs first-order FC-CNN on CUB, CUB+box, Aircraft, Cars; "
        "nf and ft (40 rows)",
        ("dataset", "setting"),
        tuple(rows),
        (
            "FC-CNN rows use average pooling of the same conv features at 448x448 (the "
            "paper: fc7 of the 224x224 network), the first-order counterpart of B-CNN.",
            "nf = linear softmax classifier on frozen features (the paper: linear SVM).",
            "FV-SIFT and FV-CNN rows are not implemented.",
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
        ("Matrix functions are exact (SVD for sqrtA, eigendecomposition for logA).",),
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
            "Linear softmax classifier on frozen features (the paper: linear SVM, C = 1).",
            "Fine-grained rows need the B-CNN VGG-16 fine-tuned on the same dataset as "
            "backbone weights (see docs/reproduce.md).",
            "DTD: split 1; FMD: trial 1 (the paper's protocol for FMD averages splits).",
        ),
    )


# Column label -> (overrides, dataset name in paper_results.csv). Slide order.
DENSENET_DATASETS = {
    "Aircraft": (("dataset=aircraft",), "FGVC-Aircraft"),
    "Cars": (("dataset=cars",), "Stanford Cars"),
    "CUB": (("dataset=cub",), "CUB"),
    **{
        sc: (
            ("dataset=inat", "dataset.version=2018", f"dataset.supercategory={sc}"),
            f"iNat2018 {sc}",
        )
        for sc in (
            "Plantae",
            "Animalia",
            "Reptilia",
            "Amphibia",
            "Aves",
            "Mollusca",
            "Fungi",
            "Mammalia",
            "Arachnida",
            "Insecta",
            "Actinopterygii",
        )
    },
}


def _densenet_inat() -> Table:
    source, table = "seed talk slides", "DenseNet-201 regular vs bilinear"
    rows = [
        Row(
            label,
            (ds,),
            (f"experiment={exp}", *over),
            PaperKey(source, table, name, method, "DenseNet-201", "ft"),
        )
        for label, exp, method in (
            ("first-order", "densenet_inat_first_order", "first-order (regular)"),
            ("bilinear", "densenet_inat_bilinear", "bilinear"),
        )
        for ds, (over, name) in DENSENET_DATASETS.items()
    ]
    return Table(
        "densenet_inat",
        "DenseNet-201 first-order vs bilinear (seed talk slides)",
        "DenseNet-201 average pooling vs Improved B-CNN (1x1 conv to 128, sqrt) after "
        "fine-tuning on 11 iNat 2018 supercategories, CUB, Cars, Aircraft (28 rows)",
        ("dataset",),
        tuple(rows),
        ("The slides give no recipe: both rows use the authors' PyTorch B-CNN recipe.",),
    )


def _nabirds() -> Table:
    return Table(
        "nabirds",
        "B-CNN [D,M] on NABirds (seed talk slides)",
        "B-CNN [D,M] fine-tuned on NABirds, 555 classes (1 row)",
        ("dataset",),
        (
            Row(
                "B-CNN [D,M]",
                ("NABirds",),
                ("experiment=nabirds_bcnn_dm", "dataset=nabirds"),
                PaperKey("seed talk slides", "NABirds", "NABirds", "B-CNN", "VGG-D+VGG-M", "ft"),
            ),
        ),
    )


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        _iccv15_table1(),
        _bmvc17_table1(),
        _bmvc17_table2(),
        _bmvc17_table3(),
        _eccv18_table1(),
        _densenet_inat(),
        _nabirds(),
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


def experiments_of(tables: Iterable[Table]) -> list[str]:
    """The distinct ``experiment=`` presets the rows of ``tables`` use, sorted."""
    return sorted({r.experiment for t in tables for r in t.rows if r.experiment})


__all__: Sequence[str] = [
    "TABLES",
    "PaperKey",
    "Row",
    "Table",
    "experiments_of",
    "get_table",
    "paper_results",
    "published",
]
