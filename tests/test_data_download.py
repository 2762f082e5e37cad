"""Downloads from a loopback HTTP server, checksums, safe extraction and the CLI."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fixtures.datasets import MAKERS, make_dtd
from hydra import compose, initialize_config_module

from bcnn.cli.prepare_data import prepare_data, sources
from bcnn.data.cars import StanfordCars
from bcnn.data.cub import CUB200
from bcnn.data.download import (
    ChecksumError,
    ExtractionError,
    UnsafeArchiveError,
    fetch,
    install_local,
    prepare,
    safe_extract,
)
from bcnn.data.inat import INaturalist
from bcnn.data.nabirds import NABirds
from bcnn.data.source import Archive
from tests.conftest import REPO_ROOT, run_train


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    finally:
        httpd.shutdown()
        httpd.server_close()


def tgz(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A gzipped tar of regular files, plus ``name -> (type, target)`` links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tree(folder: Path) -> list[str]:
    """Everything below ``folder`` (hidden entries too), as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# Incompressible members, so a truncated archive fails after some members were written.
GOOD = {"toy/a.txt": b"alpha\n", **{f"toy/img/{i}.bin": os.urandom(40_000) for i in range(4)}}


def test_fetch_good_archive_extracts_and_cleans_up(server, tmp_path: Path) -> None:
    base, www = server
    data = tgz(GOOD)
    (www / "toy").mkdir()
    (www / "toy" / "toy.tgz").write_bytes(data)
    archive = Archive("https://example.invalid/toy.tgz", md5(data), creates="toy/a.txt")
    root = tmp_path / "data" / "toy"
    assert fetch(archive, root, "toy", base_url=base, progress=False)
    assert (root / "toy" / "a.txt").read_bytes() == b"alpha\n"
    assert tree(root) == sorted(
        ["toy", "toy/a.txt", "toy/img", *(f"toy/img/{i}.bin" for i in range(4))]
    )
    assert not fetch(archive, root, "toy", base_url=base, progress=False)  # already there
    # A plain file (the MIT Indoor lists) is placed as it is.
    (www / "toy" / "List.txt").write_bytes(b"a/b.jpg\n")
    plain = Archive("https://example.invalid/List.txt", md5(b"a/b.jpg\n"), extract=False)
    assert fetch(plain, root, "toy", base_url=base, progress=False)
    assert (root / "List.txt").read_bytes() == b"a/b.jpg\n"


def test_fetch_zip_without_top_folder(server, tmp_path: Path, monkeypatch) -> None:
    base, www = server
    data = zipped({"image/fabric/x_new.jpg": b"jpg", "image/glass/y_new.jpg": b"jpg"})
    (www / "fmd").mkdir()
    (www / "fmd" / "FMD.zip").write_bytes(data)
    monkeypatch.setenv("BCNN_DATA_MIRROR", base)  # the mirror can come from the environment
    fetch(
        Archive("https://example.invalid/FMD.zip", md5(data), creates="image"),
        tmp_path / "fmd",
        "fmd",
        progress=False,
    )
    assert tree(tmp_path / "fmd") == [
        "image",
        "image/fabric",
        "image/fabric/x_new.jpg",
        "image/glass",
        "image/glass/y_new.jpg",
    ]


BAD_ARCHIVES = {
    "corrupt": (lambda: tgz(GOOD)[: len(tgz(GOOD)) // 2], ExtractionError, "cannot extract"),
    "not-an-archive": (
        lambda: b"<html>Not found</html>",
        ExtractionError,
        "neither a tar nor a zip",
    ),
    "dotdot": (
        lambda: tgz({"toy/a.txt": b"a", "../evil.txt": b"evil"}),
        UnsafeArchiveError,
        "outside",
    ),
    "symlink": (
        lambda: tgz({"toy/a.txt": b"a"}, {"toy/link": (tarfile.SYMTYPE, "../../evil")}),
        UnsafeArchiveError,
        "'toy/link' would link to .* outside",
    ),
    "hardlink": (
        lambda: tgz({"toy/a.txt": b"a"}, {"toy/hard": (tarfile.LNKTYPE, "../evil.txt")}),
        UnsafeArchiveError,
        "'toy/hard' would link to .* outside",
    ),
    "fifo": (
        lambda: tgz({"toy/a.txt": b"a"}, {"toy/fifo": (tarfile.FIFOTYPE, "")}),
        UnsafeArchiveError,
        "special file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_fail_cleanly_and_leave_nothing(server, tmp_path: Path, case: str) -> None:
    base, www = server
    make, error, message = BAD_ARCHIVES[case]
    data = make()
    (www / "toy").mkdir()
    (www / "toy" / "toy.tgz").write_bytes(data)
    before = tree(tmp_path)
    with pytest.raises(error, match=message):
        fetch(
            Archive("https://example.invalid/toy.tgz", md5(data)),
            tmp_path / "data" / "toy",
            "toy",
            base,
            progress=False,
        )
    assert tree(tmp_path) == before  # no archive, no .partial folder, no data/ folders
    assert not list(tmp_path.parent.glob("evil*")) and not Path("/tmp/evil.txt").exists()


@pytest.mark.parametrize(
    ("make", "inside"),
    [
        (lambda: tgz({"toy/a.txt": b"a", "/tmp/evil.txt": b"evil"}), "tmp/evil.txt"),
        (lambda: zipped({"ok.txt": b"a", "../evil.txt": b"evil"}), "evil.txt"),
        (lambda: zipped({"ok.txt": b"a", "/tmp/evil.txt": b"evil"}), "tmp/evil.txt"),
    ],
    ids=["tar-absolute", "zip-dotdot", "zip-absolute"],
)
def test_member_names_are_rooted_in_the_target(tmp_path: Path, make, inside: str) -> None:
    """tarfile's data filter and zipfile strip absolute prefixes and zip ``..`` parts."""
    archive = tmp_path / "a.archive"
    archive.write_bytes(make())
    safe_extract(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / inside).read_bytes() == b"evil"
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_wrong_checksum_fails_cleanly(server, tmp_path: Path) -> None:
    base, www = server
    (www / "toy").mkdir()
    (www / "toy" / "toy.tgz").write_bytes(tgz(GOOD))
    root = tmp_path / "existing"
    root.mkdir()
    with pytest.raises(ChecksumError, match="expected 0123"):
        fetch(
            Archive("https://example.invalid/toy.tgz", "0123" * 8),
            root,
            "toy",
            base,
            progress=False,
        )
    assert tree(root) == []  # the existing root stays, empty
    with pytest.raises(OSError):  # 404 from the mirror
        fetch(Archive("https://example.invalid/nope.tgz", None), root, "toy", base, progress=False)
    assert tree(root) == []


def test_safe_extract_never_overwrites(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(tgz({"toy/a.txt": b"new"}))
    (tmp_path / "out" / "toy").mkdir(parents=True)
    (tmp_path / "out" / "toy" / "a.txt").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="toy"):
        safe_extract(archive, tmp_path / "out", progress=False)
    assert tree(tmp_path / "out") == ["toy", "toy/a.txt"]
    assert (tmp_path / "out" / "toy" / "a.txt").read_bytes() == b"old"


def test_prepare_uses_the_mirror_and_checks_the_published_md5(server, tmp_path: Path) -> None:
    base, www = server
    (www / "cub").mkdir()
    (www / "cub" / "CUB_200_2011.tgz").write_bytes(tgz({"CUB_200_2011/images.txt": b"1 a.jpg\n"}))
    with pytest.raises(ChecksumError, match=CUB200.source.variants["default"][0].md5):
        prepare(CUB200.source, tmp_path / "cub", base_url=base, progress=False)
    assert not (tmp_path / "cub").exists()
    with pytest.raises(ValueError, match="no public download"):
        prepare(NABirds.source, tmp_path / "nabirds")
    with pytest.raises(ValueError, match="variant"):
        prepare(INaturalist.source, tmp_path / "inat", variant="2019")


def test_install_local_checks_known_files(tmp_path: Path) -> None:
    fake = tmp_path / "nabirds.tar.gz"
    fake.write_bytes(tgz({"nabirds/images.txt": b""}))
    with pytest.raises(ChecksumError, match="df21a9e4db349a14e2b08adfd45873bd"):
        install_local(NABirds.source, fake, tmp_path / "nabirds", progress=False)
    assert not (tmp_path / "nabirds").exists()
    kaggle = tmp_path / "stanford-cars.zip"
    kaggle.write_bytes(zipped({"cars_train/cars_train/00001.jpg": b"x"}))
    assert install_local(StanfordCars.source, kaggle, tmp_path / "cars", progress=False) is None
    assert (tmp_path / "cars" / "cars_train" / "cars_train" / "00001.jpg").is_file()


# ------------------------------------------------------------------------------------ CLI
def prepare_cli(*overrides: str) -> int:
    """``bcnn-prepare-data *overrides`` as its Hydra application runs it (errors raise)."""
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        cfg = compose("prepare_data", overrides=[*overrides, "progress=false"])
    return prepare_data(cfg)


def test_cli_lists_every_dataset_without_one(capsys) -> None:
    assert prepare_cli() == 0
    out = capsys.readouterr().out
    assert sorted(sources()) == sorted(MAKERS)  # the eight benchmarks, found through configs
    for name, source in sources().items():
        assert f"{name}: {source.title}" in out and f"data/{name}" in out
    assert "nabirds.tar.gz  md5 df21a9e4db349a14e2b08adfd45873bd" in out
    assert "cars_test_annos_withlabels.mat" in out and "Kaggle" in out
    assert "fff73e5086ae6bdbea199a49dfb8a4c1" in out  # DTD
    with pytest.raises(ValueError, match="synthetic has no files to prepare"):
        prepare_cli("dataset=synthetic")


def test_cli_download_failure_and_manual_datasets(server, tmp_path: Path, capsys) -> None:
    base, www = server
    (www / "dtd").mkdir()
    (www / "dtd" / "dtd-r1.0.1.tar.gz").write_bytes(tgz({"dtd/labels/train1.txt": b""}))
    root = tmp_path / "dtd"
    with pytest.raises(ChecksumError, match="MD5"):
        prepare_cli("dataset=dtd", f"root={root}", f"base_url={base}")
    assert not root.exists()
    assert prepare_cli("dataset=nabirds", f"root={tmp_path / 'nb'}") == 1
    out = capsys.readouterr().out
    assert "dl.allaboutbirds.org" in out and "archive=" in out and not (tmp_path / "nb").exists()


def test_cli_offline_names_the_url_and_the_archive_route(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{closed.getsockname()[1]}"
    root = tmp_path / "cub"
    script = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_data.py")]
    args = ["dataset=cub", f"root={root}", f"base_url={base}", "progress=false"]
    proc = run_train(args, cwd=tmp_path, script=script, full_error=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.splitlines()[0]
    assert message.startswith("bcnn-prepare-data: error: could not download CUB-200-2011 (")
    assert f"fetch {base}/cub/CUB_200_2011.tgz on a machine that can" in message
    assert f"bcnn-prepare-data dataset=cub root={root} archive=<file>" in message
    assert not root.exists() and not list(tmp_path.iterdir())


def test_cli_verify_reports_missing_and_unreadable_files(tmp_path: Path, capsys) -> None:
    truth = make_dtd(tmp_path / "dtd")
    assert prepare_cli("dataset=dtd", f"root={tmp_path / 'dtd'}", "verify=true") == 0
    assert "18 images, 0 missing, 0 unreadable" in capsys.readouterr().out
    folder = tmp_path / "dtd" / "dtd"
    missing, broken = folder / truth.train[0][0], folder / truth.test[0][0]
    missing.unlink()
    broken.write_bytes(broken.read_bytes()[:100])
    verify = ["dataset=dtd", f"dataset.root={tmp_path / 'dtd'}", "verify=true"]
    assert prepare_cli(*verify, "dataset.partition=2") == 1
    out = capsys.readouterr().out
    assert f"{missing}: missing" in out and f"{broken}: unreadable" in out
    assert "1 missing, 1 unreadable" in out
    shutil.rmtree(folder / "labels")
    with pytest.raises(FileNotFoundError, match=r"labels/train1\.txt"):
        prepare_cli(*verify)
