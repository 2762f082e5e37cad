"""scripts/install_torch.py: choosing a torch/torchvision pair of the same build."""

from __future__ import annotations

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
        excluded = {tuple(e.split("!=")) for e in extra}
        for torch in self.torches:
            if ("torch", torch) in excluded:
                continue
            public = torch.partition("+")[0]
            for vision in self.visions[public]:
                if ("torchvision", vision) not in excluded:
                    return torch, vision
        raise install_torch.InstallError("no candidates left")


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
