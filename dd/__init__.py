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

__all__ = ["DDError", "__version__"]
