"""Installed command-line programs (``bcnn-prepare-data``, ``bcnn-reproduce``).

Each module holds one program's ``main(argv=None) -> int``; ``pyproject.toml`` names it
under ``[project.scripts]`` and ``scripts/<name>.py`` calls the same function from a
checkout.
"""
