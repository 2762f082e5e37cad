"""The published tables, read from ``bcnn/resources/tables.csv`` (one line per published
number: a :class:`Row`) and ``tables.yaml`` (each :class:`Table`'s title, columns, notes)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import pandas as pd
import yaml


class PaperKey(NamedTuple):
    """The identifying columns of one line of ``paper_results.csv``."""

    source: str
    table: str
    dataset: str
    method: str
    backbone: str
    setting: str


# The columns of tables.csv that make a row's PaperKey.
KEY_COLUMNS = ("source", "source_table", "dataset", "method", "backbone", "setting")


def slug(text: str) -> str:
    """Lower-case ``[a-z0-9_]`` version of ``text`` (for file and config names)."""
    text = text.lower().replace("+", "_plus_").replace("=", "_")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_")


def read_resource(name: str, **read_csv: Any) -> pd.DataFrame:
    """``bcnn/resources/<name>`` read by ``pandas.read_csv(**read_csv)``."""
    with (resources.files("bcnn") / "resources" / name).open() as f:
        return pd.read_csv(f, **read_csv)


@cache
def _paper_results() -> dict[tuple[str, ...], tuple[float, float | None]]:
    df = read_resource("paper_results.csv", dtype={c: str for c in PaperKey._fields})
    keys = list(df[list(PaperKey._fields)].itertuples(index=False, name=None))
    if twice := [k for k, dup in zip(keys, df.duplicated(list(PaperKey._fields))) if dup]:
        raise ValueError(f"paper_results.csv lists {twice} more than once: keep one line each")
    stds = [None if pd.isna(s) else float(s) for s in df["std"]]
    return dict(zip(keys, zip(map(float, df["top1"]), stds)))


def published(key: PaperKey | None) -> tuple[float | None, float | None]:
    """The published (top-1 accuracy, std) for ``key``; (None, None) if not listed."""
    return _paper_results().get(tuple(key), (None, None)) if key else (None, None)


@dataclass(frozen=True)
class Row:
    """One published number and the job that reproduces it.

    Attributes:
        label: Row label as in the paper, e.g. ``"B-CNN [D,D]"``.
        columns: Column label(s) of the cell, e.g. ``("CUB", "ft")``.
        overrides: Hydra overrides of the job (group choices and key assignments only).
        key: Where the published number is in ``paper_results.csv``.
        paper: A second published number (the paper behind a talk's table).
        reason: Why the row cannot run (another authors' method); it launches no job.
        benchmark: ``(method, iters)`` of a timing row (matrix-function benchmark).
        splits: Overrides of the row's repeats, one job each (DTD's ten partitions).
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
        """Whether the row is trained (not a timing row, not another authors' method)."""
        return self.reason is None and self.benchmark is None

    @property
    def id(self) -> str:
        """Unique (within a table) name made of the label and columns."""
        return "__".join(slug(p) for p in (self.label, *self.columns))

    @property
    def job_ids(self) -> list[str]:
        """The job folder names: ``id``, or ``<id>__split<k>`` (k = 1, 2, ...) per split."""
        return [f"{self.id}__split{k + 1}" for k in range(len(self.splits))] or [self.id]

    @property
    def experiment(self) -> str | None:
        """The ``experiment=`` preset the row starts from, if any."""
        presets = (o.split("=", 1)[1] for o in self.overrides if o.startswith("experiment="))
        return next(presets, None)


@dataclass(frozen=True)
class Table:
    """A published table: its rows, in the paper's order, and how to lay the report out.

    Attributes:
        column_names: Names of the parts of ``Row.columns`` (e.g. ``("dataset", "setting")``).
        notes: Deviations from the paper's protocol printed under the report.
        reference: The report's header of the ``Row.key`` numbers (``paper`` or ``talk``).
        second: The header of the ``Row.paper`` numbers.
    """

    name: str
    title: str
    description: str
    column_names: tuple[str, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    reference: str = "paper"
    second: str = "paper"

    def row(self, row_id: str) -> Row:
        """The row with ``Row.id == row_id``."""
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(f"table {self.name} has no row {row_id!r}")


def load_tables() -> dict[str, Table]:
    """Every table of ``tables.yaml``, with its rows from ``tables.csv``."""
    meta = yaml.safe_load((resources.files("bcnn") / "resources" / "tables.yaml").read_text())
    rows: dict[str, list[Row]] = {}
    for line in read_resource("tables.csv", dtype=str, keep_default_na=False).to_dict("records"):
        method, _, iters = line["benchmark"].partition(" ")
        row = Row(
            label=line["label"],
            columns=tuple(line["columns"].split("|")),
            overrides=tuple(line["overrides"].split()),
            key=PaperKey(*(line[c] for c in KEY_COLUMNS)),
            paper=PaperKey(*line["paper"].split("|")) if line["paper"] else None,
            reason=line["reason"] or None,
            benchmark=(method, int(iters)) if method else None,
            splits=tuple(line["splits"].split()),
        )
        rows.setdefault(line["table"], []).append(row)
    if unknown := sorted(set(rows) - set(meta)):
        raise ValueError(f"tables.csv: tables {unknown} are not in tables.yaml")
    tables = {}
    for name, m in meta.items():  # the YAML keys are Table's fields; lists become tuples
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
        tables[name] = Table(name=name, rows=tuple(rows.get(name, ())), **fields)  # type: ignore[arg-type]
    return tables


TABLES: dict[str, Table] = load_tables()


def get_table(name: str) -> Table:
    """The table called ``name``; a KeyError names the known tables."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; choose one of {sorted(TABLES)}")
    return TABLES[name]
