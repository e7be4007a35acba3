"""Packaging glue: metadata lives in pyproject.toml.

setup.py exists for the parts pyproject cannot express: the built-in plugins are shipped
from ``plugins/`` as the importable package ``dd_plugins``, and the optional native op in
``csrc/`` (C++ CPU, plus CUDA where nvcc and a CUDA torch exist) is built into
``dd.ops._native`` when ``DD_BUILD_EXT=1``:

    DD_BUILD_EXT=1 pip install --no-build-isolation -e .

(``--no-build-isolation`` so that the build sees the installed torch). Without it nothing is
compiled here; the op then compiles on first use if a compiler is present (dd/ops/build.py).
"""

import os
import sys

from setuptools import find_packages, setup


def native_extension() -> dict:
    """``setup()`` arguments for the native op when ``DD_BUILD_EXT=1``, else none."""
    if os.environ.get("DD_BUILD_EXT", "0") != "1":
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "DD_BUILD_EXT=1 needs torch in the build environment: install torch, then run "
            "`DD_BUILD_EXT=1 pip install --no-build-isolation -e .`"
        )
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dd.ops.build import setup_extensions

    return setup_extensions()


setup(
    packages=find_packages(include=["dd", "dd.*"])
    + find_packages("plugins", include=["dd_plugins", "dd_plugins.*"])
    + ["dd.presets"],
    # the presets live in configs/ at the top of the tree and install as dd/presets/
    package_dir={"dd_plugins": "plugins/dd_plugins", "dd.presets": "configs"},
    package_data={
        "dd": ["testing/assets/**/*", "py.typed", "label/static/*"],
        "dd.presets": ["*.toml"],
        "dd_plugins": ["**/*.json", "weights/**/*"],
    },
    include_package_data=True,
    **native_extension(),
)
