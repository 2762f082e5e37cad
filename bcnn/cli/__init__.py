"""Installed command-line programs besides ``bcnn-train`` (``bcnn/train.py``).

``bcnn-eval`` (``evaluate``, a Hydra app), ``bcnn-predict`` (``predict``), ``bcnn-export``
(``export``), ``bcnn-prepare-data`` (``prepare_data``) and ``bcnn-reproduce``
(``reproduce``). Each module holds one program's ``main``; ``pyproject.toml`` names it
under ``[project.scripts]``. ``errors`` is their shared handling of user errors: one
message, the traceback with ``HYDRA_FULL_ERROR=1``.
"""
