"""The Penn Treebank word language model (Zaremba et al. 2014): `python -m distrnn.ptb`."""
