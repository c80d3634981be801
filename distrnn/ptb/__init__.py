"""The Penn Treebank word language model (Zaremba et al. 2014), `python -m distrnn.ptb`: its presets
(configs), the corpus (reader), the model (model) and what trains it (trainer, train), the placement plan
(plan), and the commands that use a trained run (score, generate, export, over saved_run)."""
