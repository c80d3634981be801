"""The row-by-row image classifier: `python -m distrnn.mnist`."""
