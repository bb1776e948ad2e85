"""The stages of a LEGO run, each a function of (config, inputs, run dir) -> outputs; `lego.run` calls them in order."""
