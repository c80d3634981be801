"""The scaling cost model (issue 31, first part): the hardware tables and the model's formulas, exact values
worked by hand from the shapes."""
import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module, subprocess_env
from distrnn.errors import UsageError
from distrnn.scaling import anchors, hardware, model

LARGE = model.Model(hidden_size=1500, num_layers=2, num_steps=35, vocab_size=10000)  # PTB large


def test_every_gpu_and_link_names_where_its_figures_come_from():
    for table in (hardware.GPUS, hardware.LINKS):
        for entry in table.values():
            assert len(entry.source) > 30 and entry.name
    assert {"k20", "v100", "a100", "h100", "h200"} <= set(hardware.GPUS)
    assert {"pcie3", "pcie4", "nvlink", "10gbe", "25gbe", "100gbe", "hdr", "ndr"} <= set(hardware.LINKS)
    assert hardware.gpu("H100").float16_tflops == 989  # dense, not the datasheet's sparse 1,979
    with pytest.raises(UsageError, match="--gpu b300: no GPU of that name; choose from k20, v100"):
        hardware.gpu("b300")


def test_the_model_counts_ptb_large_as_its_shapes_say():
    assert LARGE.layer_weights == 3001 * 6000
    assert LARGE.dense_weights == 2 * 3001 * 6000 + 1501 * 10000 == 51_022_000
    # 20 rows x 35 steps: 2 x (2 layers x 3000 x 6000 + 1500 x 10000) per token
    assert LARGE.forward_flops(20) == 2.0 * 700 * (2 * 3000 * 6000 + 1500 * 10000) == 71.4e9
    assert model.gradient_bytes(LARGE, 20) == {"lstm": 2 * 3001 * 6000 * 4, "softmax": 1501 * 10000 * 4,
                                               "embedding_rows": 700 * (1500 * 4 + 8),
                                               "embedding_dense": 10000 * 1500 * 4}
    assert model.gradient_bytes(LARGE, 20, fp16_allreduce=True)["softmax"] == 1501 * 10000 * 2


def test_a_small_batch_time_step_is_bound_by_memory_on_a_fast_gpu_and_by_compute_on_a_k20():
    a = model.Assumptions(matmul_efficiency=0.5)
    # One layer's time step at 20 rows: 2 x 20 x 3000 x 6000 flops; its weights read once.
    flops, weights = 2.0 * 20 * 3000 * 6000, 3001 * 6000
    k20, h200 = hardware.gpu("k20"), hardware.gpu("h200")
    assert model.roofline(flops, weights * 4, k20, "float32", 0.5) == pytest.approx(flops / (3.52e12 * 0.5))
    assert model.roofline(flops, weights * 2, h200, "float16", 0.5) == pytest.approx(weights * 2 / 4.8e12)
    assert model.compute_seconds(LARGE, 20, k20, "float32", a)["bound"] == "compute"
    assert model.compute_seconds(LARGE, 20, h200, "float16", a)["bound"] == "memory"


def test_a_layer_runs_its_time_steps_on_the_roofline_and_its_sequence_products_near_peak():
    """One PTB large layer on a made-up GPU whose figures make the arithmetic plain: 1 TFLOPS, 1 TB/s."""
    plain = hardware.GPU("plain", 1.0, 1.0, 80, 1000, "made up for the test")
    a = model.Assumptions(matmul_efficiency=0.5, sequence_efficiency=1.0, kernels_per_step=10, kernel_us=2.0)
    step_flops = 2.0 * 20 * 1500 * 6000                              # 0.36 GFLOP: 0.72 ms at half the peak
    forward = step_flops / 0.5e12                                     # its 36 MB of weights read in 0.036 ms
    kernels = 2 * 10 * 2e-6
    sequence = step_flops * 35 / 1e12
    first = model.lstm_layer_seconds(LARGE, 20, plain, "float32", a, first=True)
    assert first == pytest.approx(35 * (2 * forward + kernels) + 4 * sequence)
    # distrnn's own LSTM: a layer above the first takes its input a step at a time, the backward product slower.
    own = dataclasses.replace(a, per_step_inputs=True, backward_efficiency=0.25)
    above = model.lstm_layer_seconds(LARGE, 20, plain, "float32", own, first=False)
    assert above == pytest.approx(35 * (2 * (forward + 4 * forward) + kernels) + 2 * sequence)
    parts = model.compute_seconds(LARGE, 20, plain, "float32", a)
    assert parts["update"] == pytest.approx(4 * LARGE.dense_weights * 4 / 1e12)  # norm, then SGD: 4 passes
    assert parts["total"] == pytest.approx(2 * first + parts["softmax"] + parts["update"])


def test_the_embedding_gradient_travels_as_rows_until_gathering_them_costs_more_than_the_dense_tensor():
    """Gathering rows grows with the ranks ((n-1) x a rank's rows through every link); the dense tensor's
    all-reduce does not: PTB large's 4.2 MB of rows a rank beat its 60 MB dense tensor up to about 28 ranks."""
    assert model.ring_allgather_bytes(100, 8) == 700 and model.ring_allreduce_bytes(100, 8) == 175
    cluster = model.Cluster(hardware.gpu("h100"), hardware.link("nvlink"), hardware.link("ndr"), 8)
    chosen = {n: model.step(LARGE, n, cluster, 20)["embedding"] for n in (2, 8, 16, 64, 512)}
    assert chosen == {2: "rows", 8: "rows", 16: "rows", 64: "dense", 512: "dense"}
    forced = model.step(LARGE, 512, cluster, 20, sparse_as_dense=False)
    assert forced["embedding"] == "rows" and forced["step_s"] > 2 * model.step(LARGE, 512, cluster, 20)["step_s"]


def test_gradients_travel_in_the_order_they_are_ready_and_only_what_runs_past_the_backward_pass_shows():
    # 1 s of backward: 0.5 s of gradients ready at once go by 0.5 s; 0.25 s more ready at its end run past it.
    assert model.exposed_after_backward([(0.0, 0.5), (1.0, 0.25)], 1.0) == 0.25
    # More than the backward pass holds: the link is still busy with the first when the second is ready.
    assert model.exposed_after_backward([(0.0, 1.5), (1.0, 0.25)], 1.0) == pytest.approx(0.75)
    # Fused all-reduces of at most 64 MB: 200 MB pay the ring's latencies four times.
    nvlink = hardware.link("nvlink")
    one = model.ring_allreduce_seconds(200e6, 8, 8, nvlink, nvlink)
    assert model.ring_allreduce_seconds(200e6, 8, 8, nvlink, nvlink, fusion_bytes=64e6) == pytest.approx(
        one + 3 * 2 * 7 * 3e-6)
    # An engine slower than the link sets the pace (Gloo and gRPC on a CPU); a faster one does not show.
    small = model.Model(hidden_size=200, num_layers=2, num_steps=20)
    ten = model.Cluster(None, hardware.link("10gbe"), hardware.link("10gbe"), gpus_per_node=1)
    def seconds(engine_gbps):
        a = model.engine_assumptions("tensorflow", engine_gbps=engine_gbps)
        return model.communication(small, 2, 1, ten, 20, 0.0, a=a, sparse_as_dense=False)["total_s"]
    latencies = 5 * 30e-6  # two all-reduces (the softmax's, the LSTM's) of 2 ring steps, one gather's step
    assert seconds(0.25) - latencies == pytest.approx((seconds(0) - latencies) * 1.25 / 0.25)  # link 1.25 GB/s
    assert seconds(5.0) == seconds(0)
    # TensorFlow's RING between CPUs does not stream: its own time adds to the link's.
    a = model.engine_assumptions("tensorflow", on_cpus=True, engine_gbps=0.25)
    serial = model.communication(small, 2, 1, ten, 20, 0.0, a=a, sparse_as_dense=False)["total_s"]
    assert serial - latencies == pytest.approx((seconds(0) - latencies) * 1.25 * (1 / 1.25 + 1 / 0.25))
    assert model.engine_assumptions("tensorflow").overlap is False
    assert model.engine_assumptions("horovod").overlap and not model.engine_assumptions("horovod", True).overlap
    assert model.engine_assumptions("horovod").fusion_mb == 64
    # distrnn's TensorFlow engine: one all-reduce between GPUs (NCCL), pieces of 16 MiB between CPUs (RING).
    assert model.engine_assumptions("tensorflow").fusion_mb == 0
    assert model.engine_assumptions("tensorflow", on_cpus=True).fusion_mb == 16 * 2**20 / 1e6
    from distrnn.parallel import collective
    assert model.TENSORFLOW_PIECE_BYTES == collective.PIECE_BYTES  # the model's figure is the engine's


def test_horovods_published_512_gpu_efficiencies_are_within_ten_points_of_the_model():
    """Inception V3 and ResNet-101 90%, VGG-16 68% on 128 servers x 4 Pascal GPUs over 25 Gbit/s."""
    rows = {r["network"]: r for r in anchors.table()}
    assert {name: r["published"] for name, r in rows.items()} == {"Inception V3": 0.9, "ResNet-101": 0.9,
                                                                    "VGG-16": 0.68}
    assert all(abs(r["points"]) <= 10 for r in rows.values()), rows
    # What makes VGG-16 the one that falls: 138 M weights, 89% of them in the classifier.
    assert rows["VGG-16"]["model"] < rows["ResNet-101"]["model"] < rows["Inception V3"]["model"]
    proc = run_module("distrnn.scaling.anchors", "--json", check=0)
    assert json.loads(proc.stdout) == anchors.table()


def test_a_ring_all_reduce_costs_its_bandwidth_term_and_a_latency_a_step():
    nvlink, ndr = hardware.link("nvlink"), hardware.link("ndr")
    size = 200e6
    assert model.ring_allreduce_seconds(size, 1, 8, nvlink, ndr) == 0.0
    assert model.ring_allreduce_seconds(size, 8, 8, nvlink, ndr) == pytest.approx(
        2 * 7 / 8 * size / 450e9 + 2 * 7 * 3e-6)
    # 16 GPUs on 2 nodes: the network link carries the ring; within each node, then between the nodes.
    assert model.ring_allreduce_seconds(size, 16, 8, nvlink, ndr) == pytest.approx(
        2 * 15 / 16 * size / 50e9 + (2 * 7 * 3 + 2 * 1 * 2) * 1e-6)


def test_a_step_scales_until_the_link_bounds_it():
    slow = model.Cluster(hardware.gpu("h100"), hardware.link("nvlink"), hardware.link("10gbe"), 8)
    one = model.step(LARGE, 1, slow, 20)
    assert one["allreduce_s"] == 0 and one["bubble_s"] == 0 and one["global_batch"] == 20
    assert one["words_per_sec"] == pytest.approx(20 * 35 / one["compute_s"])
    efficiency = [model.step(LARGE, n, slow, 20)["words_per_sec"] / (n * one["words_per_sec"]) for n in (8, 64, 512)]
    assert 1 > efficiency[0] > efficiency[1] > efficiency[2] and efficiency[2] < 0.2
    assert model.step(LARGE, 512, slow, 20)["bound"] == "all-reduce"
    piped = model.step(LARGE, 2, slow, 20, pipelined=True)
    layer = model.compute_seconds(LARGE, 20, slow.gpu, layers=1)["lstm"]
    assert (piped["ranks"], piped["gpus_per_rank"]) == (1, 2) and piped["bubble_s"] == pytest.approx(layer / 35)


def test_the_planner_answers_as_written_without_tensorflow(tmp_path):
    """distrnn.devices --plan --config large --gpus 1,8,64,512 --gpu h100: a row a size and strategy, the JSON
    the same figures, a plot; TensorFlow never loaded (the command holds no GPU memory)."""
    plot = tmp_path / "efficiency.png"
    proc = run_module("distrnn.devices", "--plan", "--config", "large", "--gpus", "1,8,64,512", "--gpu", "h100",
                      "--link", "25gbe", "--gpus_per_node", 4, "--plot", plot, check=0)
    lines = proc.stdout.splitlines()
    assert lines[1] == ("on NVIDIA H100 SXM5, 4 a node: NVLink 4 (H100 SXM) within, 25 Gbit/s Ethernet (RoCE) "
                        "between")
    rows = [line.split() for line in lines[3:10]]
    assert [(r[0], r[1]) for r in rows] == [("1", "data"), ("8", "data"), ("8", "pipeline"), ("64", "data"),
                                            ("64", "pipeline"), ("512", "data"), ("512", "pipeline")]
    assert rows[0][5] == "1.00" and plot.read_bytes()[:4] == b"\x89PNG"
    r = json.loads(run_module("distrnn.devices", "--plan", "--config", "large", "--gpus", "1,8", "--json",
                              check=0).stdout)
    assert [row["global_batch"] for row in r["rows"]] == [20, 160, 80] and r["epochs"] == 55
    one = model.step(LARGE, 1, model.Cluster(hardware.gpu("h100"), hardware.link("nvlink"), hardware.link("ndr")),
                     20)
    assert r["rows"][0]["words_per_sec"] == pytest.approx(one["words_per_sec"])
    proc = run_module("distrnn.devices", "--plan", "--config", "large", "--gpus", "8", "--global_batch_size", 20,
                      "--json", check=0)
    assert [row["rows_per_rank"] for row in json.loads(proc.stdout)["rows"]] == [5]  # 20 splits over 4 ranks, not 8
    probe = subprocess.run([sys.executable, "-c", "import sys; from distrnn import devices; devices.run(['--plan', "
                            "'--gpus', '1,2', '--json']); print('tensorflow' in sys.modules)"], cwd=ROOT,
                           capture_output=True, text=True, env=subprocess_env())
    assert probe.stdout.splitlines()[-1] == "False", probe.stderr[-2000:]


@pytest.mark.parametrize("flags, problem", [
    (["--gpus", "1,x"], "--gpus 1,x: give GPU counts separated by commas, e.g. 1,8,64,512"),
    (["--gpus", "0,8"], "--gpus 0,8: each count from 1 to 65,536"),
    (["--gpus", "8", "--gpu", "b300"], "--gpu b300: no GPU of that name; choose from k20, v100, a100, h100, h200"),
    (["--gpus", "8", "--link", "slow"], "--link slow: no link of that name; choose from pcie3"),
    (["--gpus", "8", "--link_gbps", "nan"], "--link_gbps"),
    (["--gpus", "8", "--gpus_per_node", "0"], "--gpus_per_node: must be >= 1"),
    (["--gpus", "8,16", "--global_batch_size", "7"], "--global_batch_size 7 splits evenly over the ranks of none of "
                                                     "--gpus 8,16: give a multiple of the ranks, or leave it out"),
    (["--gpus", "8", "--plot", "/"], "--plot / is a directory; name a file in it, e.g. /efficiency.png"),
])
def test_bad_planner_flags_are_one_line(flags, problem):
    proc = run_module("distrnn.devices", "--plan", *flags)
    assert_one_line_error(proc, "distrnn.devices", problem)
