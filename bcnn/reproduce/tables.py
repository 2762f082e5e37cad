"""The published tables, read from ``bcnn/resources/tables.csv`` and ``tables.yaml``.

``tables.csv`` has one line per published number (a :class:`Row`), in its table's order:
``table``, ``label``, ``columns`` (``|``-separated), ``overrides`` and ``splits``
(space-separated Hydra overrides of the ``train.py`` job, from an ``experiment=`` preset),
the six fields of its key into ``paper_results.csv`` (``source, source_table, dataset,
method, backbone, setting``), ``paper`` (a second key, ``|``-separated), ``reason`` (why it
cannot run) and ``benchmark`` (``<method> <iters>`` of a timing row). ``tables.yaml`` gives
each :class:`Table`'s title, description, column names, notes and reference headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import pandas as pd
import yaml

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


def _resource(name: str, **read_csv: Any) -> pd.DataFrame:
    with (resources.files("bcnn") / "resources" / name).open() as f:
        return pd.read_csv(f, **read_csv)


@cache
def paper_results() -> pd.DataFrame:
    """``bcnn/resources/paper_results.csv`` as a DataFrame (read once)."""
    return _resource(PAPER_RESULTS, dtype={c: str for c in PaperKey._fields})


def published(key: PaperKey | None) -> tuple[float | None, float | None]:
    """The published (top-1 accuracy, std) for ``key``; (None, None) if not listed.

    Raises:
        ValueError: ``key`` matches several lines (the CSV has a duplicate).
    """
    df = paper_results()
    match = df[(df[list(PaperKey._fields)] == list(key)).all(axis=1)] if key else df[:0]
    if len(match) > 1:
        raise ValueError(f"{key} matches {len(match)} lines of {PAPER_RESULTS}")
    if match.empty:
        return None, None
    std = match["std"].iloc[0]
    return float(match["top1"].iloc[0]), None if pd.isna(std) else float(std)


@dataclass(frozen=True)
class Row:
    """One published number and the job that reproduces it.

    Attributes:
        label: Row label as in the paper, e.g. ``"B-CNN [D,D]"``.
        columns: Column label(s) of the cell, e.g. ``("CUB", "ft")``.
        overrides: Hydra overrides of the job: group choices and key assignments only
            (no ``~``/``+``, no list indices: the launcher writes them into a config file).
        key: Where the published number is in ``paper_results.csv``.
        paper: A second published number for the cell (the paper behind a talk's table),
            shown where it differs from ``key``'s.
        reason: Why the row cannot run (another authors' method); it launches no job.
        benchmark: ``(method, iters)`` of a timing row: the forward time of one 512x512
            matrix square root from the matrix-function benchmark results, not a job.
        splits: Overrides of the row's repeats, one job each (e.g. DTD's ten partitions);
            the report gives their mean and standard deviation. Empty: one job.
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
        key = "experiment="
        presets = [o.removeprefix(key) for o in self.overrides if o.startswith(key)]
        return presets[0] if presets else None


@dataclass(frozen=True)
class Table:
    """A published table: its rows and how to lay the report out.

    Attributes:
        name: Spec name (``iccv15_table1``, ...).
        title: Paper and table, for the report.
        description: One line for ``reproduce.py list``.
        column_names: Names of the parts of ``Row.columns`` (e.g. ``("dataset", "setting")``).
        rows: The rows, in the paper's order.
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


def _row(line: pd.Series) -> Row:
    """A :class:`Row` from one line of ``tables.csv``."""
    method, _, iters = line["benchmark"].partition(" ")
    return Row(
        label=line["label"],
        columns=tuple(line["columns"].split("|")),
        overrides=tuple(line["overrides"].split()),
        key=PaperKey(*line[["source", "source_table", "dataset", "method", "backbone", "setting"]]),
        paper=PaperKey(*line["paper"].split("|")) if line["paper"] else None,
        reason=line["reason"] or None,
        benchmark=(method, int(iters)) if method else None,
        splits=tuple(line["splits"].split()),
    )


def load_tables() -> dict[str, Table]:
    """Every table of ``bcnn/resources/tables.yaml``, with its rows from ``tables.csv``.

    Raises:
        ValueError: a row names a table the YAML file does not describe.
    """
    meta = yaml.safe_load((resources.files("bcnn") / "resources" / "tables.yaml").read_text())
    lines = _resource("tables.csv", dtype=str, keep_default_na=False)
    if unknown := sorted(set(lines["table"]) - set(meta)):
        raise ValueError(f"tables.csv: tables {unknown} are not in tables.yaml")
    tables = {}
    for name, m in meta.items():  # the YAML keys are Table's fields; lists become tuples
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
        rows = tuple(_row(line) for _, line in lines[lines["table"] == name].iterrows())
        tables[name] = Table(name=name, rows=rows, **fields)  # type: ignore[arg-type]
    return tables


TABLES: dict[str, Table] = load_tables()


def get_table(name: str) -> Table:
    """The table spec called ``name``.

    Raises:
        KeyError: naming the known tables.
    """
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; choose one of {sorted(TABLES)}")
    return TABLES[name]
