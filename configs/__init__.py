"""dd's configuration presets (``--config NAME``), installed as the package ``dd.presets``."""
