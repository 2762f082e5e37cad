"""The dependencies declared in pyproject.toml equal the ones the code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib")

# Import names whose distribution is named differently, for packages that may not be
# installed here (installed ones are looked up in their metadata).
IMPORT_TO_DIST = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "hydra": "hydra-core",
    "sklearn": "scikit-learn",
}
# pandas methods that need an optional dependency pandas does not install.
PANDAS_EXTRAS = {"to_markdown": "tabulate", "to_latex": "jinja2", "to_excel": "openpyxl"}
# Dependencies used as programs rather than imported: the file that runs each, and how.
TOOLS = {
    "pytest-xdist": ("Makefile", "pytest -n"),
    "ruff": ("Makefile", "ruff check"),
    "build": ("tests/test_wheel.py", '"-m", "build"'),
}
# Guarded imports used only where some other package happens to bring them.
USED_IF_PRESENT = {"httpx": "network errors of huggingface_hub's httpx transport (base.py)"}
PLUGIN = re.compile(r"hydra_plugins\.(\w+)")


def normalize(name: str) -> str:
    """PEP 503 name: ``Hydra_Core`` -> ``hydra-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(specs: Iterable[str]) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}  # type: ignore[union-attr]


PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
CORE = requirement_names(PROJECT["dependencies"])
EXTRAS = {name: requirement_names(s) for name, s in PROJECT["optional-dependencies"].items()}
DECLARED = CORE.union(*EXTRAS.values())
INSTALLED = importlib.metadata.packages_distributions()


def distribution(module: str) -> str:
    """The distribution that provides top-level module ``module``."""
    if module in IMPORT_TO_DIST:
        return IMPORT_TO_DIST[module]
    dists = INSTALLED.get(module)
    return normalize(dists[0]) if dists else normalize(module)


def _guards_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(
            isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
            for n in names
        ):
            return True
    return False


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """``(top-level module, guarded)`` for each absolute import in ``path``; guarded means
    inside ``try: ... except ImportError``."""

    def walk(node: ast.AST, guarded: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], guarded
        if isinstance(node, ast.Try) and _guards_import_error(node):
            for child in node.body:
                yield from walk(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                yield from walk(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            yield from walk(child, guarded)

    yield from walk(ast.parse(path.read_text(), filename=str(path)), False)


def third_party(paths: Iterable[Path]) -> dict[str, bool]:
    """Distribution -> whether every import of it is guarded, over ``paths``."""
    # The checkout's top level, and scripts/ (on the tests' path: benchlib).
    local = {p.stem for p in [*REPO_ROOT.iterdir(), *(REPO_ROOT / "scripts").iterdir()]}
    found: dict[str, bool] = {}
    for path in paths:
        siblings = {p.stem for p in path.parent.iterdir()}
        for module, guarded in imports(path):
            if module in sys.stdlib_module_names or module in local | siblings:
                continue
            dist = distribution(module)
            found[dist] = found.get(dist, True) and guarded
    return found


def implied(paths: Iterable[Path]) -> set[str]:
    """Dependencies the code needs without importing them: pandas' optional ones and
    Hydra launcher plugins named as strings."""
    needed = set()
    for path in paths:
        text = path.read_text()
        needed |= {dist for method, dist in PANDAS_EXTRAS.items() if f".{method}(" in text}
        needed |= {normalize(name) for name in PLUGIN.findall(text)}
    return needed


def provided_by_declared(dist: str) -> bool:
    """Whether installing the declared dependencies installs ``dist`` too (their
    requirements, recursively, as far as they are installed here)."""
    seen, todo = set(DECLARED), list(DECLARED)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for name in requirement_names(r for r in requires if "extra ==" not in r) - seen:
            seen.add(name)
            todo.append(name)
    return dist in seen


PACKAGE = sorted((REPO_ROOT / "bcnn").rglob("*.py"))
SCRIPTS = [*sorted((REPO_ROOT / "scripts").glob("*.py")), REPO_ROOT / "train.py"]
TESTS = sorted((REPO_ROOT / "tests").rglob("*.py"))


def test_core_dependencies_are_what_the_package_imports() -> None:
    found = third_party(PACKAGE)
    required = {dist for dist, guarded in found.items() if not guarded}
    required |= {d for d in implied(PACKAGE) if d in PANDAS_EXTRAS.values()}
    assert required == CORE, (
        f"imported by bcnn/ but not declared: {sorted(required - CORE)}; "
        f"declared but not imported: {sorted(CORE - required)}"
    )


def test_optional_imports_are_declared_or_come_with_a_dependency() -> None:
    optional = {dist for dist, guarded in third_party(PACKAGE).items() if guarded}
    optional |= implied(PACKAGE) - CORE
    missing = {
        d
        for d in optional
        if d not in DECLARED and d not in USED_IF_PRESENT and not provided_by_declared(d)
    }
    assert not missing, f"optional imports with no declared distribution: {sorted(missing)}"


def test_scripts_and_tests_use_only_declared_dependencies() -> None:
    for paths, allowed in ((SCRIPTS, DECLARED), (TESTS, CORE | EXTRAS["dev"])):
        needed = set(third_party(paths)) | implied(paths)
        assert needed <= allowed, f"undeclared: {sorted(needed - allowed)}"


def test_every_extra_is_used() -> None:
    every = PACKAGE + SCRIPTS + TESTS
    used = set(third_party(every)) | implied(every)
    for tool, (where, command) in TOOLS.items():
        assert command in (REPO_ROOT / where).read_text(), f"{tool} is not used in {where}"
        used.add(tool)
    for extra, names in EXTRAS.items():
        assert names <= used, f"extra {extra!r} declares unused {sorted(names - used)}"


def test_pre_commit_runs_the_pinned_ruff() -> None:
    (pin,) = [s for s in PROJECT["optional-dependencies"]["dev"] if s.startswith("ruff")]
    config = (REPO_ROOT / ".pre-commit-config.yaml").read_text()
    hooks = re.findall(r'additional_dependencies: \["(ruff[^"]*)"\]', config)
    assert hooks and set(hooks) == {pin}, (pin, hooks)


def test_detects_guarded_and_unguarded_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\nimport numpy as np\nfrom PIL import Image\n"
        "try:\n    import httpx\nexcept ImportError:\n    pass\n"
        "def f():\n    import scipy.io\n    df.to_" + "markdown()\n"  # split: not a use here
    )
    assert third_party([source]) == {"numpy": False, "pillow": False, "httpx": True, "scipy": False}
    assert implied([source]) == {"tabulate"}
