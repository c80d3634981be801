"""Adam for distrnn's models: Keras's, with each variable's update on that variable's device.

A module of its own so that a job that does not use it never loads Keras's optimizers (73 more
modules than `import tensorflow` loads): with them loaded, the PTB job's out-of-memory test crashed
TensorFlow (SIGSEGV, no Python error) in 2 of 8 runs under the capped CPU allocator, against 0 of 6
without (tests/test_memory.py, test_out_of_memory_stops_with_a_checkpoint_and_advice).
"""
import tensorflow as tf


class Adam(tf.keras.optimizers.Adam):
    """Keras places the moment slots beside their variables but leaves the arithmetic of the
    update unplaced, so with layers on several GPUs every layer's update would run on the
    first GPU and copy its gradient and slots there and back."""

    def update_step(self, gradient, variable):
        with tf.device(variable.device):
            return super().update_step(gradient, variable)
