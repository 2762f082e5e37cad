"""scripts/install_torch.py: choosing a torch/torchvision pair of the same build."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from tests.conftest import REPO_ROOT, load_script

install_torch = load_script("install_torch")


class FakePip:
    """Answers like pip would from a list of (torch, torchvision) candidates, newest
    first, skipping versions excluded with ``name!=version``."""

    def __init__(self, torches: list[str], visions: dict[str, list[str]]) -> None:
        self.torches, self.visions, self.calls = torches, visions, []

    def __call__(self, extra: Sequence[str]) -> tuple[str, str]:
        self.calls.append(list(extra))
        excluded = {tuple(e.split("!=")) for e in extra if "!=" in e}
        pinned = dict(e.split("==") for e in extra if "==" in e)
        for torch in self.torches:
            if ("torch", torch) in excluded:
                continue
            public = torch.partition("+")[0]
            for vision in self.visions.get(public, []):
                if ("torchvision", vision) not in excluded and pinned.get(
                    "torchvision", vision
                ) in (vision, vision.partition("+")[0]):
                    return torch, vision
        raise install_torch.InstallError("no candidates left")

    def versions(self, name: str) -> list[str]:
        """What ``pip index versions`` lists."""
        if name == "torch":
            return self.torches
        return sorted({v for vs in self.visions.values() for v in vs}, reverse=True)


def test_reads_the_floors_from_pyproject() -> None:
    specs = install_torch.requirements((REPO_ROOT / "pyproject.toml").read_text())
    assert sorted(s.split(">=")[0] for s in specs) == ["torch", "torchvision"]
    with pytest.raises(install_torch.InstallError, match="one torch and one torchvision"):
        install_torch.requirements('dependencies = ["torch>=2.5"]')


def test_a_cpu_torch_beside_a_pypi_torchvision_is_replaced() -> None:
    # This machine's case: a CPU wheel of torch 2.13 in a find-links folder sorts above
    # PyPI's 2.13.0, but no CPU torchvision is reachable.
    pip = FakePip(["2.13.0+cpu", "2.13.0"], {"2.13.0": ["0.28.0"]})
    assert install_torch.choose_pair(pip, prefer="") == ("2.13.0", "0.28.0")
    assert pip.calls == [[], ["torch!=2.13.0+cpu"]]


def test_cpu_index_prefers_the_cpu_torchvision() -> None:
    pip = FakePip(["2.14.1+cpu"], {"2.14.1": ["0.29.1", "0.29.1+cpu"]})
    assert install_torch.choose_pair(pip, prefer="cpu") == ("2.14.1+cpu", "0.29.1+cpu")
    assert pip.calls[-1] == ["torchvision!=0.29.1"]


def test_agreeing_pair_is_taken_at_once_and_disagreement_fails_clearly() -> None:
    pip = FakePip(["2.14.1"], {"2.14.1": ["0.29.1"]})
    assert install_torch.choose_pair(pip, prefer=None) == ("2.14.1", "0.29.1")
    assert pip.calls == [[]]
    calls = []
    with pytest.raises(install_torch.InstallError, match=r"torchvision!=0\.28\.0.*TORCH_INDEX"):
        install_torch.choose_pair(
            lambda extra: calls.append(extra) or ("2.13.0+cpu", "0.28.0"), "cpu"
        )
    assert len(calls) == install_torch.MAX_ROUNDS


def test_label() -> None:
    assert install_torch.label("2.5.1+cu124") == "cu124"
    assert install_torch.label("0.20.1") == ""


def _offline_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU, PyTorch's CPU index unreachable, no TORCH_INDEX_URL (this machine's case)."""
    monkeypatch.delenv("TORCH_INDEX_URL", raising=False)
    monkeypatch.setattr(install_torch, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install_torch, "reachable", lambda index, timeout=10.0: False)


def test_a_cpu_pair_in_a_wheel_folder_is_taken_without_the_cpu_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _offline_cpu_machine(monkeypatch)
    # find-links holds torch 2.13.0+cpu and torchvision 0.28.0+cpu; PyPI has newer CUDA builds.
    pip = FakePip(
        ["2.14.1", "2.13.0+cpu", "2.13.0"],
        {"2.14.1": ["0.29.1"], "2.13.0": ["0.28.0+cpu", "0.28.0"]},
    )
    index_args, prefer, where, pair = install_torch.plan(lambda args: pip, pip.versions)
    assert pair == ("2.13.0+cpu", "0.28.0+cpu") and prefer == "cpu" and index_args == []
    assert "CPU pair" in where and "CUDA" not in where
    assert pip.calls == [["torchvision==0.28.0+cpu"]]


def test_a_cpu_torch_beside_a_cuda_torchvision_is_no_pair_and_cuda_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _offline_cpu_machine(monkeypatch)
    # This machine: a CPU wheel of torch 2.13 in /opt/wheels, torchvision only as CUDA builds.
    pip = FakePip(["2.14.1", "2.13.0+cpu", "2.13.0"], {"2.14.1": ["0.29.1"], "2.13.0": ["0.28.0"]})
    assert install_torch.cpu_pair(pip.versions, pip) is None
    index_args, prefer, where, pair = install_torch.plan(lambda args: pip, pip.versions)
    assert pair is None and prefer == "" and index_args == [] and where.startswith("WARNING")
    assert "CUDA" in where and install_torch.CUDA_SIZE in where and "PIP_FIND_LINKS" in where
    assert install_torch.choose_pair(pip, prefer) == ("2.14.1", "0.29.1")


def test_the_cuda_warning_comes_before_anything_is_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _offline_cpu_machine(monkeypatch)
    pip = FakePip(["2.14.1"], {"2.14.1": ["0.29.1"]})
    monkeypatch.setattr(install_torch, "pip_versions", pip.versions)
    monkeypatch.setattr(install_torch, "pip_resolver", lambda index_args, specs: pip)
    printed_before_install = []

    def run(cmd, **kwargs):
        if "install" in cmd:
            printed_before_install.append(capsys.readouterr().out)
        return subprocess.CompletedProcess(cmd, 0, stdout="2.14.1 0.29.1", stderr="")

    monkeypatch.setattr(install_torch.subprocess, "run", run)
    assert install_torch.main([]) == 0
    (before,) = printed_before_install
    assert "WARNING" in before and "6.4 GB" in before and "torch==2.14.1" in before
