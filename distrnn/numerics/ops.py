"""Numerical building blocks shared by the models."""
import functools

import tensorflow as tf

# Below this probability -log(p) is taken from the log-sum-exp instead (float32's
# smallest normal number is 1.2e-38; the softmax kernel may flush smaller ones to 0).
_TINY = 1e-30


def matmul(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """tf.matmul for 2-D a and b, with float16 products summed in float32, as they are on GPUs: there cuBLAS
    multiplies half inputs with float32 accumulation (TensorFlow's TF_FP16_MATMUL_USE_FP32_COMPUTE, on by
    default), while TensorFlow 2.15's CPU kernel for half accumulates in half, 4096 ones summing to 2048, and
    runs about 400 times slower than float32 (400 x 650 by 650 x 2600: 1.2 s against 3 ms). 2.21's CPU kernel
    sums in float32; this path is kept on every version, so that every stack sums alike. There the product is
    taken of float32 copies and rounded to float16 once; inputs, output and what the backward keeps stay
    float16. A stack on GPUs takes TensorFlow's kernel instead (`matmul_for`)."""
    if a.dtype != tf.float16:
        return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    return _float32_sums(transpose_a, transpose_b)(a, b)


def gpu_matmul(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """TensorFlow's own kernel in every dtype: on a GPU cuBLAS already sums float16 in float32."""
    return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def matmul_for(on_gpu: bool):
    """The matmul a stack uses where it runs (distrnn.rnn.Unrolling carries the choice to its cells, kernels
    and output layer, so that models never look at devices, and two models in one process may differ)."""
    return gpu_matmul if on_gpu else matmul


def _product(a, b, transpose_a, transpose_b):
    """a @ b (each transposed as asked) of float16 a and b, summed in float32, rounded once to float16."""
    return tf.cast(tf.matmul(tf.cast(a, tf.float32), tf.cast(b, tf.float32), transpose_a=transpose_a,
                             transpose_b=transpose_b), tf.float16)


@functools.lru_cache(maxsize=None)
def _float32_sums(transpose_a: bool, transpose_b: bool):
    """_product with its gradients taken the same way, from the float16 a, b and upstream gradient (autodiff
    of the float32 copies would keep a float32 copy of every activation for the backward)."""
    @tf.custom_gradient
    def product(a, b):
        def grad(g):  # TensorFlow's MatMul gradients, one case per pair of transpositions
            if not transpose_a and not transpose_b:
                return _product(g, b, False, True), _product(a, g, True, False)
            if not transpose_a:
                return _product(g, b, False, False), _product(g, a, True, False)
            if not transpose_b:
                return _product(b, g, False, True), _product(a, g, False, False)
            return _product(b, g, True, True), _product(g, a, True, True)
        return _product(a, b, transpose_a, transpose_b), grad
    return product


def softmax_cross_entropy(features, weights, bias, labels, class_rows: bool = False, matmul=matmul):
    """The cross-entropy of softmax(features @ weights + bias) against integer
    `labels`: features (N, H), weights (H, V), bias (V,), labels (N,) -> (N,).
    class_rows: weights are (V, H), one row a class (an embedding tied to the
    softmax), used as they are stored: no transposed copy a step.

    Same values and gradients as tf.nn.sparse_softmax_cross_entropy_with_logits
    on the logits, but the softmax layer and its loss are one function, which
    on CPU takes 10.4 ms forward and backward for N = 400, H = 200, V = 6049
    against 12.2 ms for the logits matmul followed by a separate loss (and 5.5
    ms more for TensorFlow's loss op alone):
      - forward: one Softmax kernel (oneDNN's on CPU) instead of max, subtract,
        exp and sum, each a pass over the (N, V) logits; the loss is
        -log p[label], or, in the rare window where some p[label] underflows,
        the log-sum-exp form, computed only then;
      - backward: G = softmax - onehot(labels) is made in place from the
        softmax, and the upstream gradient d (N,) is applied to the small side
        of each product: d_features = d * (G W^T), d_weights = (d * features)^T G,
        d_bias = G^T d. The (N, V) gradient of the logits is never scaled or
        copied.

    In bfloat16 or float16 (features, weights and bias of that dtype) the matmuls run in it and
    the softmax, its normaliser and the loss in float32 (a sum over V = 10,000 classes of 16-bit
    terms loses the small ones); G is cast back to the 16-bit dtype for the backward matmuls and
    d_bias is summed in float32. The loss is float32 whatever the precision. matmul: the stack's
    (`matmul_for`).
    """
    labels = tf.cast(labels, tf.int32)

    @tf.custom_gradient
    def layer(features, weights, bias):
        logits = tf.cast(tf.nn.bias_add(matmul(features, weights, transpose_b=class_rows), bias), tf.float32)
        probs = tf.nn.softmax(logits)
        picked = tf.gather(probs, labels, axis=1, batch_dims=1)
        loss = tf.cond(tf.reduce_all(picked > _TINY), lambda: -tf.math.log(picked),
                       lambda: tf.reduce_logsumexp(logits, axis=1) - tf.gather(logits, labels, axis=1, batch_dims=1))

        def grad(d_loss):
            rows_and_labels = tf.stack([tf.range(tf.shape(labels)[0]), labels], axis=1)
            g32 = tf.tensor_scatter_nd_sub(probs, rows_and_labels, tf.ones_like(d_loss))   # softmax - onehot
            d_bias = tf.cast(tf.linalg.matvec(g32, d_loss, transpose_a=True), bias.dtype)
            g = tf.cast(g32, features.dtype)  # the identity in float32
            d_column = tf.cast(d_loss[:, None], features.dtype)
            if class_rows:
                d_features, d_weights = matmul(g, weights), matmul(g, features * d_column, transpose_a=True)
            else:
                d_features = matmul(g, weights, transpose_b=True)
                d_weights = matmul(features * d_column, g, transpose_a=True)
            return d_features * d_column, d_weights, d_bias

        return loss, grad

    return layer(features, weights, bias)
