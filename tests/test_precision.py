"""Reduced precision (distrnn.numerics.precision): bfloat16 and float16 against float32 on the same weights,
the dtypes a traced step computes, saves and hands the optimizer, float16's loss scaling (an
overflow skips exactly that step), resume and checkpoints across precisions, and the flags."""
import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_one_line_error, checkpoint_step, run_ptb, too_high_then_settled
from distrnn import cpu
from distrnn.config import override
from distrnn.mnist.configs import PRESETS as MNIST_PRESETS
from distrnn.mnist.trainer import Trainer as MNISTTrainer
from distrnn.numerics.precision import LossScale
from distrnn.ptb.configs import PRESETS
from distrnn.ptb import job as ptb_job
from distrnn.ptb.configs import RunOptions
from distrnn.ptb.trainer import Trainer, make_model_plan
from distrnn.rnn import Memory, Unrolling

SMALL = {"hidden_size": "16", "num_steps": "6", "batch_size": "4", "num_layers": "2", "max_grad_norm": "5"}
VOCAB = 40
# Relative error ||g - g32|| / ||g32|| of every gradient, bounded by 10 units of roundoff of bfloat16
# (2^-8 = 3.9e-3) and 20 of float16 (2^-11 = 4.9e-4): each gradient passes through dozens of roundings
# (embedding rows, 2 layers x 6 steps forward and back, the softmax), whose errors add up mostly at
# random; float16's are also amplified by the loss scale's division. Measured maxima over the cases
# below (tests run with -s print each): bfloat16 1.8e-2 (peepholes), float16 2.5e-3 (peepholes; its matmuls
# summed in float32 on CPU as on GPUs: distrnn.numerics.ops.matmul).
BOUND = {"bfloat16": 10 * 2.0 ** -8, "float16": 20 * 2.0 ** -11}

PIPELINE = "pipeline"  # in a case's overrides: two layers on two devices, pipelined
CASES = [  # (config overrides, memory mode)
    ({"rnn_mode": "static"}, Memory()),
    ({"rnn_mode": "dynamic", PIPELINE: True}, Memory()),
    ({"cell": "gru", "rnn_mode": "dynamic", PIPELINE: True}, Memory()),
    ({"rnn_mode": "dynamic", "keep_prob": "0.5"}, Memory()),
    ({"rnn_mode": "dynamic"}, Memory(recompute=2)),
    ({"rnn_mode": "dynamic", "use_peepholes": "true"}, Memory()),
    ({"rnn_mode": "block"}, Memory()),
    ({"cell": "gru", "rnn_mode": "static"}, Memory()),
    ({"cell": "rnn", "rnn_mode": "dynamic", "tie_embeddings": "true"}, Memory()),
]


def ptb_trainer(overrides, memory, precision):
    overrides = dict(overrides)
    pipelined = overrides.pop(PIPELINE, False)
    config = override(PRESETS.get("test"), dict(SMALL, **overrides))
    plan = make_model_plan(config, VOCAB, ["/device:CPU:0", "/device:CPU:1"], "round_robin") if pipelined else None
    unrolling = Unrolling.for_config(config, config.num_steps, placement=PIPELINE if pipelined else "sequential",
                                     memory=memory, precision=precision)
    return Trainer(config, VOCAB, seed=3, unrolling=unrolling, plan=plan)


def window(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, (4, 6)).astype(np.int32)
    return x, rng.integers(0, VOCAB, (4, 6)).astype(np.int32)


def gradients(trainer, x, y):
    """The float32 gradients of one window's loss as the optimizer receives them (in float16 through the
    trainer's loss scale: unscaled, many of these gradients are below float16's smallest number)."""
    model = trainer.model

    @tf.function
    def compute():
        with tf.GradientTape() as tape:
            features, _ = model(x, model.zero_state(4), training=True)
            loss = tf.reduce_sum(model.token_losses(features, y)) / 4.0
        grads, finite = trainer.loss_scale.gradients(tape, loss, model.trainable_variables)
        return loss, [tf.convert_to_tensor(g) for g in grads], finite

    loss, grads, finite = compute()
    assert bool(finite)
    return float(loss), [g.numpy() for g in grads]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("overrides, memory", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in dict(
    c._asdict() if hasattr(c, "_asdict") else c).items() if v) or "keep")
def test_gradients_match_float32_on_the_same_weights(precision, overrides, memory):
    if overrides.get("rnn_mode") == "block" and precision == "bfloat16":
        pytest.skip("BlockLSTM has no bfloat16 kernel (refused: test_fused_mode_without_the_dtype_is_refused)")
    x, y = window()
    loss32, reference = gradients(ptb_trainer(overrides, memory, "float32"), x, y)
    loss, grads = gradients(ptb_trainer(overrides, memory, precision), x, y)
    assert loss == pytest.approx(loss32, rel=BOUND[precision] / 4)
    for g, g32 in zip(grads, reference):
        assert g.dtype == np.float32
        error = np.linalg.norm(g - g32) / np.linalg.norm(g32)
        print(f"{precision} {overrides} {memory}: relative error {error:.2e}")
        assert error < BOUND[precision]


def with_branches(graph):
    """The graph's ops and those of its tf.cond branches (float16's updates run in one: distrnn.numerics.precision)."""
    ops = list(graph.get_operations())
    for op in graph.get_operations():
        if op.type in ("If", "StatelessIf"):
            for branch in ("then_branch", "else_branch"):
                ops += with_branches(graph._get_function(op.get_attr(branch).name).graph)
    return ops


@pytest.mark.parametrize("precision, overrides, memory", [
    ("bfloat16", {"rnn_mode": "static"}, Memory()), ("float16", {"rnn_mode": "dynamic"}, Memory()),
    ("bfloat16", {"rnn_mode": "dynamic"}, Memory(recompute=2)), ("float16", {"cell": "gru"}, Memory())])
def test_a_traced_step_saves_16_bit_activations_and_hands_the_optimizer_float32(precision, overrides, memory):
    """On the graph of the training step: every tensor the forward pass leaves for the backward pass (the
    forward's ops are those traced before the loss) is in the compute dtype, except the softmax's float32
    probabilities; every gradient that reaches an update op is float32, as are the variables."""
    trainer = ptb_trainer(overrides, memory, precision)
    x, y = window()
    graph = trainer.train_step.get_concrete_function(x, y, trainer.model.zero_state(4)).graph
    ops = graph.get_operations()
    loss_id = next(op for op in ops if op.name == "truediv")._id  # the batch mean: the forward's last op
    saved = {}
    for op in ops:
        if op._id > loss_id and op.type != "Shape":
            for t in op.inputs:
                if t.op._id <= loss_id and t.dtype.is_floating and t.shape.rank:
                    saved[t.name] = t.dtype.name
    float32 = sorted(name for name, dtype in saved.items() if dtype == "float32")
    assert float32 == ["softmax/Softmax:0"]
    assert set(saved.values()) == {"float32", precision}
    assert sum(dtype == precision for dtype in saved.values()) >= 10
    updates = [op for op in with_branches(graph) if op.type in ("ResourceApplyGradientDescent", "ResourceScatterSub")]
    assert len(updates) == len(trainer.model.trainable_variables)
    assert {t.dtype.name for op in updates for t in op.inputs[1:]} <= {"float32", "int32", "int64"}
    assert {v.dtype for v in trainer.model.variables if v.dtype.is_floating} == {tf.float32}


def weights_of(trainer):
    return [v.numpy().copy() for v in list(trainer.model.variables) + list(trainer.optimizer.variables)]


def test_an_overflow_skips_exactly_that_step_halves_the_scale_and_changes_no_weight():
    trainer = ptb_trainer({}, Memory(), "float16")
    scale = trainer.loss_scale
    x, y = window()
    state = trainer.model.zero_state(4)
    scale.scale.assign(2.0 ** 40)  # the scaled loss's gradients overflow float16 (65504) in the backward pass
    before = weights_of(trainer)
    loss, norm, skipped, _ = trainer.train_step(x, y, state)
    assert bool(skipped) and not np.isfinite(float(norm)) and np.isfinite(float(loss))
    for a, b in zip(before, weights_of(trainer)):
        np.testing.assert_array_equal(a, b)  # every weight, the learning rate and the step count
    assert (float(scale.scale), int(scale.overflows), int(scale.good_steps)) == (2.0 ** 39, 1, 0)
    scale.scale.assign(2.0 ** 10)
    _, norm, skipped, _ = trainer.train_step(x, y, state)
    assert not bool(skipped) and np.isfinite(float(norm))
    assert int(trainer.optimizer.iterations) == 1 and int(scale.good_steps) == 1 and int(scale.overflows) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(trainer)))


def test_the_scale_doubles_after_a_run_of_good_steps_and_never_falls_below_one():
    trainer = ptb_trainer({}, Memory(), "float16")
    scale = trainer.loss_scale
    scale.GROWTH_STEPS = 3  # read when the step is traced
    x, y = window()
    state = trainer.model.zero_state(4)
    seen = []
    for _ in range(7):
        trainer.train_step(x, y, state)
        seen.append((float(scale.scale), int(scale.good_steps)))
    s = LossScale.INITIAL
    assert seen == [(s, 1), (s, 2), (2 * s, 0), (2 * s, 1), (2 * s, 2), (4 * s, 0), (4 * s, 1)]
    # Non-finite gradients at the smallest scale: not skipped but reported (the loop stops on the norm),
    # and still no weight changes.
    scale.scale.assign(LossScale.MINIMUM)
    trainer.model.softmax_b.assign(tf.fill(trainer.model.softmax_b.shape, np.nan))
    before = weights_of(trainer)
    _, norm, skipped, _ = trainer.train_step(x, y, state)
    assert not bool(skipped) and not np.isfinite(float(norm)) and float(scale.scale) == LossScale.MINIMUM
    for a, b in zip(before, weights_of(trainer)):
        np.testing.assert_array_equal(a, b)


def test_running_a_step_again_ends_where_halving_cannot_help():
    """An infinite scale (only a tampered checkpoint holds one) halves to itself: the step is run
    ATTEMPTS times and handed back overflowed, for the loop to stop as diverged."""
    scale, attempts = LossScale(True), []
    scale.scale.assign(np.inf)
    outputs = scale.until_applied(lambda: attempts.append(1) or ("overflowed", np.inf), lambda o: True)
    assert outputs == ("overflowed", np.inf) and len(attempts) == LossScale.ATTEMPTS
    assert LossScale(False).until_applied(lambda: attempts.append(1) or "once", lambda o: True) == "once"
    assert len(attempts) == LossScale.ATTEMPTS + 1


def test_mnist_skips_an_overflowed_step_without_moving_adam():
    config = override(MNIST_PRESETS.get("test"), {"hidden_size": "8"})
    trainer = MNISTTrainer(config, (6, 5), seed=1, unrolling=Unrolling.for_config(config, 6, precision="float16"))
    images = np.random.default_rng(0).normal(size=(8, 6, 5)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % 10
    trainer.loss_scale.scale.assign(2.0 ** 40)
    before = [v.numpy().copy() for v in list(trainer.model.variables) + list(trainer.optimizer.variables)]
    loss, _, norm, skipped = trainer.train_step(images, labels).numpy()
    assert skipped == 1.0 and not np.isfinite(norm) and np.isfinite(loss)
    after = [v.numpy() for v in list(trainer.model.variables) + list(trainer.optimizer.variables)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    trainer.loss_scale.scale.assign(2.0 ** 8)
    assert trainer.train_step(images, labels).numpy()[3] == 0.0 and int(trainer.optimizer.iterations) == 1


def from_initial(monkeypatch, train):
    """train(name) as a train(name, scale) for too_high_then_settled: the scale set in this process."""
    def run(name, scale):
        monkeypatch.setattr(LossScale, "INITIAL", scale)
        return train(name)
    return run


def test_an_overflowed_step_runs_again_on_the_same_batch_with_the_same_dropout(corpus, tmp_path, monkeypatch):
    """No window is lost to an overflow: each overflowed attempt halves the scale and the window runs
    again, drawing the same dropout masks, so the run is exactly the one that started at the scale it
    came down to (skipping the window, or drawing new masks, would change every figure)."""
    config = override(PRESETS.get("test"), dict(SMALL, keep_prob="0.8"))
    high, low = too_high_then_settled(from_initial(monkeypatch, lambda name: ptb_job.run(config, RunOptions(
        data_path=corpus, precision="float16", max_steps=5, save_path=str(tmp_path / name)))))
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert high[key] == low[key], key


def test_mnist_runs_an_overflowed_step_again(images, tmp_path, monkeypatch):
    from distrnn.mnist.configs import RunOptions as MNISTOptions
    from distrnn.mnist.job import run as train_mnist
    config = override(MNIST_PRESETS.get("test"), {"hidden_size": "8", "validation_size": "100"})
    high, low = too_high_then_settled(from_initial(monkeypatch, lambda name: train_mnist(config, MNISTOptions(
        data_path=images, precision="float16", max_steps=4, save_path=str(tmp_path / name)))))
    for key in ("valid_accuracy", "test_accuracy", "test_loss"):
        assert high[key] == low[key], key


def test_float16_resumes_exactly_with_its_loss_scale(corpus, tmp_path, monkeypatch):
    """From 2^40 and with GROWTH_STEPS 4, the scale comes down at the first step and doubles every 4 steps
    (until a doubling overflows), on both sides of the resume."""
    monkeypatch.setattr(LossScale, "INITIAL", 2.0 ** 40)
    monkeypatch.setattr(LossScale, "GROWTH_STEPS", 4)
    config = override(PRESETS.get("test"), dict(SMALL, keep_prob="0.8"))
    options = dict(data_path=corpus, precision="float16")
    straight = ptb_job.run(config, RunOptions(save_path=str(tmp_path / "a"), max_steps=12, **options))
    ptb_job.run(config, RunOptions(save_path=str(tmp_path / "b"), max_steps=7, **options))
    resumed = ptb_job.run(config, RunOptions(save_path=str(tmp_path / "b"), max_steps=12, resume=True,
                                                    **options))
    assert resumed["loss_scale"] == straight["loss_scale"]
    assert straight["loss_scale"]["overflows"] > 0 and straight["loss_scale"]["scale"] < 2.0 ** 40
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert resumed[key] == straight[key], key


@pytest.mark.parametrize("first, then", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16")])
def test_a_checkpoint_resumes_in_another_precision(corpus, tmp_path, first, then):
    """The variables are float32 in every precision: the checkpoint is the same; the figures after the
    switch are those of the run in `then` (or float32) to the 16-bit type's tolerance."""
    config = override(PRESETS.get("test"), SMALL)
    ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "run"), max_steps=6,
                                          precision=first))
    switched = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "run"),
                                                     max_steps=12, resume=True, precision=then))
    straight = ptb_job.run(config, RunOptions(data_path=corpus, save_path=str(tmp_path / "straight"),
                                                     max_steps=12))
    assert switched["steps"] == 12 and switched["precision"] == then
    assert switched["test_perplexity"] == pytest.approx(straight["test_perplexity"], rel=0.02)
    assert (switched["loss_scale"] is not None) == (then == "float16")


def test_use_fp16_is_float16_and_refusals_are_one_line(tmp_path, corpus):
    run = run_ptb("--config", "test", "--data_path", corpus, "--max_steps", "3", "--use_fp16",
                  "--save_path", str(tmp_path / "r"), "--metrics_json", str(tmp_path / "m.json"), check=0)
    assert "precision float16 (dynamic loss scale, now 32768)" in run.stdout + run.stderr
    # Said where this processor converts float16 around every kernel, whichever processor runs the test.
    assert ("no native float16 arithmetic" in run.stdout) == cpu.processor().lacks_native("float16")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["precision"] == "float16" and metrics["loss_scale"]["good_steps"] == 3
    assert checkpoint_step(tmp_path / "r") == 3
    refused = run_ptb("--config", "test", "--data_path", corpus, "--use_fp16", "--precision", "bfloat16")
    assert_one_line_error(refused, "distrnn.ptb", "--use_fp16 means --precision float16", "pass one of them")
    refused = run_ptb("--config", "test", "--data_path", corpus, "--rnn_mode", "block", "--precision",
                      "bfloat16", "--save_path", str(tmp_path / "b"))
    assert_one_line_error(refused, "distrnn.ptb", "rnn_mode block has no bfloat16 kernel", "--rnn_mode dynamic")
    assert not (tmp_path / "b").exists()
    refused = run_ptb("--config", "test", "--data_path", corpus, "--precision", "float8")
    assert_one_line_error(refused, "distrnn.ptb", "--precision", "float8")


def test_the_gpu_path_runs_cudnn_in_float16_and_the_loop_in_bfloat16(monkeypatch):
    """What a GPU would run, resolved and built here: auto picks cuDNN in float16 (tensor cores) and the
    dynamic loop in bfloat16, which cuDNN's RNN ops do not take; cuDNN's weights are cast to float16."""
    from distrnn.rnn import LSTMCell, fused, resolve_mode
    monkeypatch.setattr(fused, "built_with_cudnn", lambda: True)
    assert resolve_mode("lstm", False, "auto", True, 35, precision="float16")[0] == "cudnn"
    assert resolve_mode("lstm", False, "auto", True, 35, precision="bfloat16")[0] == "dynamic"
    assert resolve_mode("lstm", False, "auto", True, 35)[0] == "cudnn"
    with pytest.raises(ValueError, match="rnn_mode cudnn has no bfloat16 kernel"):
        resolve_mode("lstm", False, "cudnn", True, 35, precision="bfloat16")
    weights, biases = fused._cudnn_lstm_params(LSTMCell(3, 4), tf.float16)
    assert len(weights) == len(biases) == 8 and {t.dtype for t in weights + biases} == {tf.float16}


def test_a_run_saved_before_the_loss_scale_existed_resumes_in_float16(corpus, tmp_path, monkeypatch):
    """Checkpoints written before distrnn kept a loss scale have none: they resume (in any precision), the
    scale starting at its initial value."""
    config = override(PRESETS.get("test"), SMALL)
    options = dict(data_path=corpus, save_path=str(tmp_path / "run"))
    parts = Trainer.checkpoint_parts
    with monkeypatch.context() as patch:  # what an earlier distrnn saved
        patch.setattr(Trainer, "checkpoint_parts", lambda self: {k: v for k, v in parts(self).items()
                                                                 if k != "loss_scale"})
        ptb_job.run(config, RunOptions(max_steps=5, **options))
    names = {n.split("/")[0] for n, _ in tf.train.list_variables(str(tmp_path / "run" / "checkpoints"))}
    assert "loss_scale" not in names and "model" in names
    resumed = ptb_job.run(config, RunOptions(max_steps=9, resume=True, precision="float16", **options))
    assert resumed["steps"] == 9
    assert resumed["loss_scale"] == {"scale": LossScale.INITIAL, "overflows": 0, "good_steps": 4}
