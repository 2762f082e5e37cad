"""NABirds: 48,562 images of 555 leaf classes (23,929 train / 24,633 test).

Split protocol: the official ``train_test_split.txt``. ``trainval`` is the whole official
train set, ``train``/``val`` carve a stratified ``val_fraction`` of it, ``test`` is the
official test set.
"""

from __future__ import annotations

from pathlib import Path

from bcnn.data.base import Splits, read_rows
from bcnn.data.caltech import CaltechListDataset
from bcnn.data.source import Archive, DatasetSource


class NABirds(CaltechListDataset):
    """NABirds, with labels over the leaf classes that images use.

    ``classes.txt`` also lists the inner nodes of the taxonomy, so class ids are sparse:
    the label set is the ids used in ``image_class_labels.txt``, sorted numerically and
    mapped to ``0..554``. Image ids are UUID strings. Options are those of
    :class:`~bcnn.data.base.FileDataset`; ``bbox_crop`` crops to ``bounding_boxes.txt``.
    ``root`` is ``data/nabirds`` (holding ``nabirds/``) or ``nabirds/`` itself.

    Attributes:
        class_ids: Original id of each label (``class_ids[label]``).
        hierarchy: ``child id -> parent id`` over the whole taxonomy (``hierarchy.txt``).
        node_names: ``id -> name`` of every taxonomy node (``classes.txt``).
    """

    source = DatasetSource(
        name="nabirds",
        title="NABirds",
        homepage="https://dl.allaboutbirds.org/nabirds",
        layout="""\
<root>/                        e.g. data/nabirds (root may also be nabirds/ itself)
  nabirds/
    images/<4-digit class id>/<uuid>.jpg
    images.txt  image_class_labels.txt  train_test_split.txt  classes.txt  hierarchy.txt
    bounding_boxes.txt         (used by bbox_crop)""",
        manual="""\
no public download; access is gated: fill in the form at
  https://dl.allaboutbirds.org/nabirds to get the link to nabirds.tar.gz, then install it
  with checksum verification:
     bcnn-prepare-data dataset=nabirds root=data/nabirds \\
         archive=nabirds.tar.gz""",
        known_files=(
            Archive(
                "https://dl.allaboutbirds.org/nabirds/nabirds.tar.gz",
                "df21a9e4db349a14e2b08adfd45873bd",
                creates="nabirds/images.txt",
            ),
        ),
    )
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
        chain, node = [], self.class_ids[label]
        while (node := self.hierarchy.get(node)) is not None and node not in chain:
            chain.append(node)
        return chain
