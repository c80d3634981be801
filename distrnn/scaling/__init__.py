"""How far a job scales before anyone rents the GPUs: the GPUs and links a plan can assume (hardware, each
figure with its datasheet) and the cost model of a training step on them (model: compute from the model's
shapes against the GPU's roofline, the gradients' all-reduce over the link, the pipeline's fill and drain).
TensorFlow-free, like the memory plan it stands beside (distrnn.devices --plan)."""
