"""distrnn: stacked recurrent networks across GPUs and nodes with TensorFlow 2 and Horovod."""

__version__ = "0.1.0"
