"""The plugin API: the base classes a backbone, detector or scorer implements
(:mod:`dd.api.backbones`, :mod:`dd.api.detectors`, :mod:`dd.api.scorers`), the hook
specifications (:mod:`dd.api.hookspecs`), the plugin host with the one loader per kind
(:mod:`dd.api.plugins`) and option checking (:mod:`dd.api.plugin_options`)."""
