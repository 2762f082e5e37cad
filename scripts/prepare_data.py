"""``bcnn-prepare-data`` from a checkout: download, install and verify the datasets."""

from bcnn.cli.prepare_data import main

if __name__ == "__main__":
    main()
