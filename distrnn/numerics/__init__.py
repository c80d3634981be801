"""The numbers a model computes with: shared ops (ops: the fused softmax loss, matmuls in a precision),
reduced precision and loss scaling (precision), and the optimizers (sgd, adam), each updating a variable
on the device that holds it."""
