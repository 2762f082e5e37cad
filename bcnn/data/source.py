"""How a dataset is obtained and how it sits on disk.

The declarations are data, in ``bcnn/resources/datasets.yaml``; each loader holds its own
as the class attribute ``source`` (``DatasetSource.named("cub")``), quotes it in its
missing-file errors, and ``bcnn-prepare-data`` finds it through the loader class a
``configs/dataset/<name>.yaml`` points at. Downloading lives in :mod:`bcnn.data.download`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml


@functools.cache
def _declared() -> dict[str, Any]:
    text = (resources.files("bcnn") / "resources" / "datasets.yaml").read_text("utf-8")
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Archive:
    """One downloadable file of a dataset.

    Attributes:
        url: Official URL.
        md5: Published MD5, or ``None`` where the host publishes none.
        subdir: Folder below the dataset root it is extracted (or copied) into.
        creates: Path below the dataset root that exists once this file is in place;
            downloading skips the file when it exists.
        extract: ``False`` for plain files (list files, ``.mat``) copied as they are.
    """

    url: str
    md5: str | None
    subdir: str = ""
    creates: str = ""
    extract: bool = True

    @property
    def filename(self) -> str:
        """The file name of the URL, without its query string."""
        return self.url.split("?", 1)[0].rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSource:
    """How to obtain one dataset and how it must sit on disk.

    Attributes:
        name: The dataset's config name (``cub``, ``aircraft``, ...), also its folder
            below ``$BCNN_DATA``.
        title: Human-readable name.
        layout: The folder tree the loader expects, relative to ``dataset.root``.
        homepage: The dataset's page ("" for user data).
        variants: Downloadable file sets by variant name; empty when there is no public
            download and ``manual`` applies.
        default_variant: The variant downloaded by default.
        manual: How to obtain the data by hand (gated or dead hosts, or user data).
        known_files: Further files with known MD5s that users obtain by hand and install
            with ``bcnn-prepare-data archive=<file>``.
    """

    name: str
    title: str
    layout: str
    homepage: str = ""
    variants: Mapping[str, tuple[Archive, ...]] = field(default_factory=dict)
    default_variant: str = "default"
    manual: str = ""
    known_files: tuple[Archive, ...] = ()

    @property
    def downloadable(self) -> bool:
        """Whether ``bcnn-prepare-data`` can download or install any file of it."""
        return bool(self.variants or self.known_files)

    def how_to_obtain(self) -> str:
        """One paragraph for error messages: the command to run or the manual steps."""
        if not self.variants:
            return self.manual.strip()
        urls = ", ".join(a.url for a in self.variants[self.default_variant])
        return (
            f"run `bcnn-prepare-data dataset={self.name} root=<root>` "
            f"(downloads {urls}), or download from {self.homepage} and extract into the root."
        )

    @classmethod
    def named(cls, name: str) -> DatasetSource:
        """The declaration of dataset ``name`` in ``bcnn/resources/datasets.yaml``."""
        fields = dict(_declared()[name])
        fields["variants"] = {
            variant: tuple(Archive(**a) for a in archives)
            for variant, archives in fields.get("variants", {}).items()
        }
        fields["known_files"] = tuple(Archive(**a) for a in fields.get("known_files", ()))
        return cls(name=name, **fields)

    def all_files(self) -> tuple[Archive, ...]:
        """Every file with a known name and checksum, downloadable or not."""
        files = [a for archives in self.variants.values() for a in archives]
        return tuple(dict.fromkeys([*files, *self.known_files]))
