"""Helpers for tests and users' smoke checks.

:mod:`dd.testing.tiny` writes tiny offline pipelines of the real diffusers/transformers
classes (``python -m dd.testing.tiny BACKBONE OUTDIR``). It is not imported here, so that
``python -m dd.testing.tiny`` runs the module once, as ``__main__``.
"""
