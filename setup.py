"""The package list, which pyproject.toml cannot express.

configs/ sits beside bcnn/ and installs as ``bcnn.configs`` (``package-dir`` in
pyproject.toml). setuptools' automatic discovery only looks below bcnn/, so the mapped
package would be left out of the wheel, and pyproject.toml cannot combine discovery with
an explicit entry. Data-only folders (bcnn/resources, the config groups) are listed as
namespace packages so that setuptools ships them without deprecation warnings. Everything
else is configured in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

SKIP = ["*__pycache__*"]
bcnn = find_namespace_packages(include=["bcnn", "bcnn.*"], exclude=SKIP)
groups = find_namespace_packages(where="configs", exclude=SKIP)
setup(packages=[*bcnn, "bcnn.configs", *(f"bcnn.configs.{group}" for group in groups)])
