"""Guards against running out of memory: what a model will hold before it runs (estimates), what the
devices and the host hold while it runs (monitor), and NVML's reading of the GPUs (nvml), which imports
no TensorFlow so that `python -m distrnn.devices` holds no GPU memory."""
