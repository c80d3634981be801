"""The row-by-row image classifier, `python -m distrnn.mnist`: each image read as a sequence of rows by a
recurrent stack, its presets (configs), IDX files (idx), the model (model), what trains it (trainer, train)
and its plots (plots)."""
