"""dd: diagnose and treat artifacts of text-to-image diffusion models."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

from dd.errors import DDError  # noqa: E402

# bitsandbytes (imported by peft when installed, for --quantize nf4 and 8-bit AdamW) warns on
# import that an optional CPU kernel package is missing; dd never needs it. DD_DEBUG=1 keeps
# the warning.
if not _os.environ.get("DD_DEBUG"):
    _logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

#: Modules that moved into layer folders (issue 35): the old names still import, with a
#: DeprecationWarning, so third-party plugins written against them keep working.
MOVED = {
    "dd.backbones": "dd.api.backbones",
    "dd.detectors": "dd.api.detectors",
    "dd.scorers": "dd.api.scorers",
    "dd.hookspecs": "dd.api.hookspecs",
    "dd.registry": "dd.api.registry",
    "dd.plugins": "dd.api.plugins",
    "dd.plugin_options": "dd.api.plugin_options",
    "dd.quantize": "dd.ops.quantize",
    "dd.kernels": "dd.ops.kernels",
    "dd.bench": "dd.engines.bench",
    "dd.web": "dd.runtime.web",
    "dd.guidance": "dd.inference.guidance",
    "dd.scores": "dd.inference.scores",
    "dd.image_scores": "dd.inference.image_scores",
    "dd.metrics": "dd.inference.metrics",
    "dd.label.mine": "dd.engines.mine",
    "dd.label.pseudo": "dd.engines.pseudo",
}


class _MovedModules:
    """A meta-path finder that answers an old module name with the moved module itself
    (the same module object: ``dd.backbones.Backbone is dd.api.backbones.Backbone``)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in MOVED:
            return None
        import importlib.machinery
        import importlib.util

        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: object) -> object:
        import importlib
        import warnings

        old = spec.name  # type: ignore[attr-defined]
        warnings.warn(
            f"{old} moved to {MOVED[old]}; import it from there",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(MOVED[old])

    def exec_module(self, module: object) -> None:
        pass


import sys as _sys  # noqa: E402

if not any(isinstance(f, _MovedModules) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModules())

__all__ = ["DDError", "__version__"]
