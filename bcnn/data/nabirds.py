"""NABirds: 48,562 images of 555 leaf classes, official train/test split (docs/datasets.md)."""

from __future__ import annotations

from pathlib import Path

from bcnn.data.base import Splits, read_rows
from bcnn.data.caltech import CaltechListDataset
from bcnn.data.source import DatasetSource


class NABirds(CaltechListDataset):
    """NABirds, with labels over the 555 leaf classes that images use (ids sorted).

    Image ids are UUID strings. ``root`` is ``data/nabirds`` (holding ``nabirds/``) or
    ``nabirds/`` itself; the options are those of :class:`~bcnn.data.base.FileDataset`.

    Attributes:
        class_ids: Original id of each label (``class_ids[label]``).
        hierarchy: ``child id -> parent id`` over the whole taxonomy (``hierarchy.txt``).
        node_names: ``id -> name`` of every taxonomy node (``classes.txt``).
    """

    source = DatasetSource.named("nabirds")
    folders = ("nabirds", ".")
    files = (*CaltechListDataset.files, "hierarchy.txt")

    def parse(self, folder: Path) -> Splits:
        """The Caltech lists, plus the taxonomy of ``hierarchy.txt``."""
        splits = super().parse(folder)
        self.hierarchy = {
            int(child): int(parent) for child, parent in read_rows(folder / "hierarchy.txt")
        }
        return splits

    def ancestors(self, label: int) -> list[int]:
        """Taxonomy node ids above a label's class, nearest first, up to the root."""
        chain: list[int] = []
        node = self.hierarchy.get(self.class_ids[label])
        while node is not None and node not in chain:
            chain.append(node)
            node = self.hierarchy.get(node)
        return chain
