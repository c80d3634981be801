"""The scaling cost model (issue 31, first part): the hardware tables and the model's formulas, exact values
worked by hand from the shapes."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module, subprocess_env
from distrnn.errors import UsageError
from distrnn.scaling import hardware, model

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
                                               "embedding_rows": 700 * (1500 * 4 + 8)}
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
