"""Engines: the long-running jobs behind the commands (detect, and later train/treat/refine)."""
