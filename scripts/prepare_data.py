"""``bcnn-prepare-data`` from a checkout: download, install and verify the datasets."""

import sys

from bcnn.cli.prepare_data import main, parse_args  # noqa: F401  (tests import them from here)

if __name__ == "__main__":
    sys.exit(main())
