"""Reports: HTML contact sheets (``html``), heat-map overlays (``viz``), charts (``plot``)."""
