"""dd: diagnose and treat artifacts of text-to-image diffusion models."""

__version__ = "0.1.0"

from dd.errors import DDError  # noqa: E402

__all__ = ["DDError", "__version__"]
