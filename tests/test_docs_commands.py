"""Every ``python train.py`` command of the README and docs composes and validates, and
every command line of the other Hydra commands (eval, viz, prepare-data, reproduce)
composes.

A command whose options were renamed, or that sets a key its defaults do not have (a
transform size on the built-in dataset), fails here instead of in a reader's terminal.
Sweeps, placeholders (``<...>``, ``...``) and shell variables are left out; the checks
``train`` runs before any data or model work run too.
"""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_module

from bcnn.config import validate
from tests.conftest import REPO_ROOT, compose_config

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINE = re.compile(r"^(?:\$ )?(?:python train\.py|bcnn-train)((?: .*)?)$")
# The other Hydra commands, by their config.
OTHERS = {
    "eval": r"bcnn-eval|python -m bcnn\.cli\.evaluate",
    "viz": r"bcnn-viz|python -m bcnn\.viz",
    "prepare_data": r"bcnn-prepare-data|python scripts/prepare_data\.py",
    "reproduce": r"bcnn-reproduce|python scripts/reproduce\.py",
}


def _lines(text: str) -> list[str]:
    """The page's lines, a shell line continued with a backslash joined to the next."""
    lines: list[str] = []
    for line in text.splitlines():
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


def _commands(line_pattern: re.Pattern[str] = LINE) -> list[tuple[str, list[str]]]:
    found = {}
    for page in PAGES:
        for line in _lines(page.read_text()):
            match = line_pattern.match(line)
            if match is None:
                continue
            args = shlex.split(match.group(1), comments=True)
            # Sweeps (an hparams_search is one), placeholders and shell variables.
            skip = ("...", "<", "$", "hparams_search=")
            if any(a in ("-m", "--multirun") or any(t in a for t in skip) for a in args):
                continue
            if any(a.startswith("--") for a in args):  # --cfg job, --help
                continue
            if any(a.startswith("[") or re.search(r"=[A-Z]+$", a) for a in args):  # usage
                continue
            found.setdefault(" ".join(args), (page.name, args))
    return sorted(found.values(), key=lambda item: " ".join(item[1]))


COMMANDS = _commands()


def test_the_pages_show_commands() -> None:
    assert len(COMMANDS) > 30
    assert any(args == ["pooling=democratic_avg"] for _, args in COMMANDS)


@pytest.mark.parametrize(("page", "args"), COMMANDS, ids=[" ".join(a) for _, a in COMMANDS])
def test_documented_command_composes_and_validates(page: str, args: list[str]) -> None:
    cfg = compose_config(args)
    validate(cfg)


OTHER_COMMANDS = [
    (config, page, args)
    for config, command in OTHERS.items()
    for page, args in _commands(re.compile(rf"^(?:\$ )?(?:{command})((?: .*)?)$"))
]


def test_the_pages_show_the_other_commands() -> None:
    assert {config for config, _, _ in OTHER_COMMANDS} == set(OTHERS)


@pytest.mark.parametrize(
    ("config", "page", "args"), OTHER_COMMANDS, ids=[" ".join(a) for _, _, a in OTHER_COMMANDS]
)
def test_documented_command_of_another_tool_composes(config: str, page: str, args: list[str]):
    with initialize_config_module("bcnn.configs", version_base="1.3"):
        compose(config, overrides=args)
