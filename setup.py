"""Packaging glue: metadata lives in pyproject.toml.

setup.py exists for the parts pyproject cannot express: the built-in plugins are shipped
from ``plugins/`` as the importable package ``dd_plugins``, and (from the kernels issue on)
the optional native extension in ``csrc/`` is built here when ``DD_BUILD_EXT=1``.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dd", "dd.*"])
    + find_packages("plugins", include=["dd_plugins", "dd_plugins.*"]),
    package_dir={"dd_plugins": "plugins/dd_plugins"},
    package_data={"dd": ["testing/assets/**/*", "py.typed"], "dd_plugins": ["**/*.json"]},
    include_package_data=True,
)
