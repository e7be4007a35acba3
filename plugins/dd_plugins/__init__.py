"""dd's built-in plugins: backbones and detectors, loaded through the ``dd`` entry points."""
