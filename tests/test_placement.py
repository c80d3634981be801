"""Model parallelism: plans, device checks, where variables and ops land, pipeline == sequential."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_ptb
from distrnn.config import override
from distrnn.errors import UsageError
from distrnn.parallel import local_devices, placement
from distrnn.ptb.configs import PRESETS
from distrnn.ptb.trainer import Trainer
from distrnn.rnn import Unrolling
from distrnn.rnn.lstm_sequence import KEEP, Layer, Memory, lstm_stack

CPU = [f"/device:CPU:{i}" for i in range(4)]
COMPUTE_OPS = {"MatMul", "BatchMatMulV2", "Mul", "AddV2", "Sub", "Sigmoid", "Tanh", "SigmoidGrad", "TanhGrad",
               "RealDiv", "Exp", "Log", "Sum", "SelectV2", "Neg", "Square", "TensorScatterSub", "Max"}


def test_round_robin_plan():
    plan = placement.make_plan(3, CPU[:2])
    assert plan.layers == (CPU[0], CPU[1], CPU[0])
    assert (plan.embedding, plan.softmax) == (CPU[0], CPU[0])
    assert plan.devices == CPU[:2] and plan.multi_device


def test_balanced_plan_minimises_the_largest_device():
    # parts: embedding 10, layers 1 and 1, softmax 10 -> best split 11 | 11
    plan = placement.make_plan(2, CPU[:2], "balanced", costs=[10, 1, 1, 10])
    assert (plan.embedding, plan.layers, plan.softmax) == (CPU[0], (CPU[0], CPU[1]), CPU[1])
    # one huge softmax gets a device of its own
    plan = placement.make_plan(2, CPU[:2], "balanced", costs=[1, 1, 1, 50])
    assert (plan.embedding, plan.layers, plan.softmax) == (CPU[0], (CPU[0], CPU[0]), CPU[1])
    # more devices than parts: each part alone, the rest unused
    plan = placement.make_plan(1, CPU, "balanced", costs=[3, 3, 3])
    assert plan.devices == CPU[:3]


def test_plan_dict_and_description():
    plan = placement.make_plan(2, CPU[:2], costs=[2**20, 2**21, 2**21, 2**22])
    assert plan.as_dict()["layers"] == [CPU[0], CPU[1]]
    lines = plan.describe()
    assert lines[0] == "placement plan (round_robin, 2 device(s)):"
    assert "softmax    -> /device:CPU:1" in lines[-1] and "4.0 MiB" in lines[-1]


def test_devices_are_checked():
    assert local_devices.resolve_devices("/cpu:1, /cpu:3") == [CPU[1], CPU[3]]
    with pytest.raises(UsageError, match=r"device\(s\) /device:GPU:0 do not exist; this machine has "
                                         r"/device:CPU:0, .*--virtual_devices"):
        local_devices.resolve_devices(num_gpus=1)
    with pytest.raises(UsageError, match="lists a device twice"):
        local_devices.resolve_devices("/cpu:0,/cpu:0")


def small_config(**kw):
    base = {"hidden_size": "8", "num_steps": "5", "batch_size": "3", "num_layers": "3", "max_grad_norm": "5"}
    return override(PRESETS.get("test"), dict(base, **kw))


def all_ops(graph):
    """Every op of a graph and of the functions it calls (while bodies, conditions)."""
    ops = list(graph.get_operations())
    for fn in getattr(graph, "_functions", {}).values():
        if hasattr(fn, "graph"):
            ops += all_ops(fn.graph)
    return ops


@pytest.mark.parametrize("rnn_mode, schedule", [("static", "sequential"), ("dynamic", "sequential"),
                                                 ("block", "sequential"), ("dynamic", "pipeline")])
def test_variables_and_ops_land_where_the_plan_says(rnn_mode, schedule):
    config = small_config(rnn_mode=rnn_mode, keep_prob="0.5")
    plan = placement.make_plan(3, CPU[1:4])  # layers on CPU:1, 2, 3; embedding with the first, softmax the last
    trainer = Trainer(config, vocab_size=20, seed=0, unrolling=Unrolling.for_config(config, config.num_steps, placement=schedule), plan=plan)
    model = trainer.model
    assert model.embedding.device.endswith(CPU[1]) and model.softmax_w.device.endswith(CPU[3])
    for cell, device in zip(model.cells, plan.layers):
        assert all(v.device.endswith(device) for v in cell.trainable_variables), cell.name

    x = tf.zeros([3, 5], tf.int32)
    graph = trainer.train_step.get_concrete_function(x, x, model.zero_state(3)).graph
    # Every op that computes (forward and backward, inside while loops too) runs on its layer's
    # device. Ops that only hold or move tensors (TensorList bookkeeping, slicing, identities)
    # are left to TensorFlow's placer, which puts them next to their inputs.
    placed = {d: {"forward": 0, "backward": 0} for d in plan.layers}
    for op in all_ops(graph):
        layer = re.search(r"(?:^|/)layer_(\d+)(?:_\d+)?/", op.name)  # layer_1/, or layer_1_7/ when reentered
        if op.type in COMPUTE_OPS and layer:
            device = plan.layers[int(layer.group(1))]
            assert op.device == device, (op.name, op.type, op.device)
            placed[device]["backward" if "gradient" in op.name else "forward"] += 1
    assert all(n > 0 for counts in placed.values() for n in counts.values()), placed
    for op in all_ops(graph):
        if op.type in COMPUTE_OPS and "softmax/" in op.name:
            assert op.device == plan.softmax, (op.name, op.type, op.device)


def grads_of(trainer, x, y):
    model = trainer.model
    with tf.GradientTape() as tape:
        features, state = model(x, model.zero_state(3), training=True)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.reshape(tf.transpose(y), [-1]), logits=model.logits(features)))
    grads = tape.gradient(loss, model.trainable_variables)
    return [loss] + [s for layer in state for s in layer] + [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("rnn_mode", ["static", "dynamic"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_pipeline_equals_sequential(rnn_mode, cell):
    config = small_config(rnn_mode=rnn_mode, cell=cell, keep_prob="0.7")
    plan = placement.make_plan(3, CPU[:3])
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, (3, 5)).astype(np.int32)
    y = rng.integers(0, 20, (3, 5)).astype(np.int32)
    results = {}
    for schedule in ("sequential", "pipeline"):
        trainer = Trainer(config, vocab_size=20, seed=4, unrolling=Unrolling.for_config(config, config.num_steps, placement=schedule),
                          plan=plan)  # same weights, same masks
        results[schedule] = [t.numpy() for t in tf.function(lambda a, b: grads_of(trainer, a, b))(x, y)]
    for a, b in zip(results["sequential"], results["pipeline"]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_cli_placement_and_bad_devices(corpus, tmp_path):
    metrics = tmp_path / "m.json"
    proc = run_ptb("--config", "test", "--num_layers", "2", "--hidden_size", "8", "--batch_size", "4",
                   "--num_steps", "5", "--data_path", corpus, "--save_path", tmp_path / "s", "--max_steps", "5",
                   "--virtual_devices", "2", "--placement", "pipeline", "--metrics_json", metrics, check=0)
    assert "layer 1    -> /device:CPU:1" in proc.stdout
    m = json.loads(metrics.read_text())
    assert m["placement"]["layers"] == ["/device:CPU:0", "/device:CPU:1"]
    assert m["placement"]["schedule"] == "pipeline"
    bad = run_ptb("--config", "test", "--data_path", corpus, "--save_path", tmp_path / "t", "--devices", "/gpu:0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("distrnn.ptb: error: device(s) /device:GPU:0 do not exist; this machine has "
                                  "/device:CPU:0 (pass --virtual_devices N to split the CPU into N devices)")


@pytest.mark.parametrize("mode", ["swap", "keep"])
def test_swap_keeps_the_saved_activations_on_the_host_device(mode):
    # CPU:1 stands in for the accelerator that runs both layers, CPU:0 for the host.
    memory = Memory(swap=True, host=CPU[0], segment=2) if mode == "swap" else KEEP
    rng = np.random.default_rng(0)
    layers = [Layer(tf.constant(rng.uniform(-0.1, 0.1, (8, 16)), tf.float32), tf.zeros([16]), 1.0, device=CPU[1])
              for _ in range(2)]
    states = [(tf.zeros([3, 4]), tf.zeros([3, 4]))] * 2

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out, _ = lstm_stack(x, states, layers, static=False, memory=memory)
            loss = tf.reduce_sum(out * out)
        return tape.gradient(loss, x)

    x = tf.constant(rng.normal(size=(5, 3, 4)), tf.float32)
    ops = all_ops(grads.get_concrete_function(x).graph)
    on_host = [op for op in ops if op.device == CPU[0]]
    if mode == "keep":
        assert on_host == []  # everything the backward pass needs stays on the layers' device
        return
    # Per layer four records (out, a, c, j) go into host TensorLists in the forward pass, segment by
    # segment, and are read back on the host in the backward pass; the layers' ops consume them there.
    writes = [op for op in on_host if op.type == "TensorListSetItem"]
    reads = [op for op in on_host if op.type == "TensorListGetItem"]
    assert len(writes) == len(reads) == 8 and all("gradient" in op.name for op in reads)
    assert not any("gradient" in op.name for op in writes)
    assert {op.type for op in on_host} <= {"TensorListSetItem", "TensorListGetItem", "TensorListReserve", "Const",
                                           "Placeholder"}  # the lists entering the loops
    for op in reads:  # each goes back to the accelerator to be used
        users = [user for user in op.outputs[0].consumers()]
        assert users and all(user.device == CPU[1] for user in users), [(u.name, u.device) for u in users]
    assert np.isfinite(grads(x).numpy()).all()
