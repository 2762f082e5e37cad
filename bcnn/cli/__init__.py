"""The console scripts, the top layer: Hydra applications (``evaluate``, ``viz``,
``prepare_data``, ``reproduce``, with ``bcnn/train.py``) that run ``overrides.check_overrides``
first, and argparse ones that take file paths (``predict``, ``export``)."""
