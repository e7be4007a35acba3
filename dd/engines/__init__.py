"""Engines: the long-running jobs behind the commands, one module per job (detect, treat,
dreambooth, refine, refine_train, train_detector). Each takes a config and returns a result;
the CLI only parses options and renders what an engine returns."""
