"""``python -m bcnn.viz kind=... run=...``: ``bcnn-viz`` (``bcnn.cli.viz``)."""

from bcnn.cli.viz import main

if __name__ == "__main__":
    main()
