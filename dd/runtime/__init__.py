"""Runtime, the lowest layer: atomic files and journals (``io``), devices and accelerators
(``device``), checkpoints (``checkpoint``), configuration presets (``config``), progress bars
(``progress``). It imports nothing else of dd but ``dd.errors``."""
