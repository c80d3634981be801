"""Data parallelism under a real `horovodrun --gloo -np 2 -H localhost:2` (what every engine does, run on
each engine, is in tests/test_engines.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import (ROOT, checkpoint_step, killed_after_first_checkpoint, launched, launcher_command, run_module,
                      signalled_at_first_progress, subprocess_env, write_corpus, write_images)
from distrnn import cli, parallel
from distrnn.errors import UsageError
from distrnn.parallel import local_devices
from distrnn.parallel.horovod import HorovodWorld


def horovodrun_command(np_, *args, command=None):
    """`horovodrun --gloo -np N -H localhost:N python -m distrnn.ptb ARGS` (or `command`)."""
    return launcher_command("horovod", np_, command or [sys.executable, "-m", "distrnn.ptb", *args])


def weights(save_path):
    reader = tf.train.load_checkpoint(os.path.join(save_path, "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("model/") and "OPTIMIZER" not in n]
    return {n: reader.get_tensor(n) for n in names}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A corpus and images for the module, and the single-process runs that several tests compare with
    (made once, on first use)."""
    root = tmp_path_factory.mktemp("horovod")
    # 100 steps an epoch of 2 x 2 rows: three epochs (learning-rate decay in two) compare at little cost.
    return {"corpus": write_corpus(root / "corpus", train_words=2000, other_words=600),
            "images": write_images(root / "images"), "root": root}


def one_process(shared, name, module, *args):
    """The metrics and save path of `python -m MODULE ARGS` run once for the whole module."""
    out = shared["root"] / name
    if not (out / "m.json").exists():
        out.mkdir(exist_ok=True)
        run_module(module, *args, "--save_path", out / "run", "--metrics_json", out / "m.json", check=0)
    return json.loads((out / "m.json").read_text()), out / "run"


PTB_SPLIT = ["--config", "test", "--hidden_size", "8", "--num_layers", "2", "--num_steps", "5", "--max_max_epoch", "3",
             "--max_epoch", "1", "--keep_prob", "1.0", "--max_grad_norm", "5", "--seed", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("split", [["--batch_size", "2"], ["--global_batch_size", "4", "--sparse_as_dense"],
                                   ["--batch_size", "2", "--virtual_devices", "2", "--placement", "pipeline"]],
                         ids=["batch_per_rank", "global_batch_dense_embedding", "layers_on_2_devices_per_rank"])
def test_two_ranks_equal_one_process_with_twice_the_batch(shared, tmp_path, split):
    common = [*PTB_SPLIT, "--data_path", shared["corpus"]]
    proc = launched("horovod", 2, *common, *split, "--save_path", tmp_path / "two",
                      "--metrics_json", tmp_path / "two.json")
    one, one_path = one_process(shared, "ptb_batch_4", "distrnn.ptb", *common, "--batch_size", "4")
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch_size"] == one["global_batch_size"] == 4
    assert two["steps"] == one["steps"] > 0
    assert len(two["words_per_sec_per_rank"]) == 2
    # Every epoch's train and valid perplexity, and the test perplexity at the end (float32 sums
    # in another order: agreement to 1e-5).
    assert len(two["history"]) == len(one["history"]) > 0  # zip below would drop an epoch one of them lacks
    for a, b in zip(two["history"], one["history"]):
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-5)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-5)
    assert two["test_perplexity"] == pytest.approx(one["test_perplexity"], rel=1e-5)
    w2, w1 = weights(tmp_path / "two"), weights(one_path)
    assert w2.keys() == w1.keys() and len(w1) >= 4
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # Only rank 0 prints progress and writes files.
    assert proc.stdout.count("done:") == 1


@pytest.mark.slow
def test_every_step_two_ranks_match_one_process_and_each_other(corpus, tmp_path):
    """Step by step: the loss of 2 ranks x 2 rows equals that of 1 process x 4 rows, and after every
    step both ranks hold bit-identical weights."""
    script = os.path.join(ROOT, "tests", "replica_steps.py")
    launched("horovod", 2, command=[sys.executable, script, corpus, str(tmp_path / "two.json"), "4", "12"])
    subprocess.run([sys.executable, script, corpus, str(tmp_path / "one.json"), "4", "12"], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert len(two["steps"]) == len(one["steps"]) == 12
    for step, (a, b) in enumerate(zip(two["steps"], one["steps"])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), step  # float32 sums in another order
        assert a["max_replica_difference"] == 0.0, step                # allreduced: the same bits everywhere
    for name, values in one["weights"].items():
        np.testing.assert_allclose(two["weights"][name], values, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_sigterm_to_horovodrun_checkpoints_and_resumes_exactly(corpus, tmp_path):
    """A scheduler's SIGTERM reaches every rank through horovodrun; the ranks agree on the step, rank 0
    saves and restores on --resume; weights, optimizer, dropout generator, position and every rank's
    carried LSTM state (the signal comes at the first progress line, a tenth into a 500-step epoch) reach
    all ranks, and the run continues as the uninterrupted one. As in test_cli, the stopped run has no end
    it could reach before the signal."""
    common = ["--config", "test", "--hidden_size", "8", "--num_steps", "3", "--batch_size", "2", "--keep_prob", "0.8",
              "--max_grad_norm", "5", "--max_max_epoch", "1000000", "--data_path", corpus,
              "--checkpoint_every", "100000"]
    _, output = signalled_at_first_progress(horovodrun_command(2, *common, "--save_path", tmp_path / "b"), timeout=60)
    # Not horovodrun's exit code: it gives the ranks 5 s after its SIGTERM (Horovod's GRACEFUL_TERMINATION_TIME_S),
    # then stops and kills what is left, so what it reports depends on how fast a loaded machine tears TensorFlow
    # down (docs/horovod.md; seen in CI: no code at all, and once 0 after the ranks had saved). test_cli and
    # test_slurm check the code of a run that stops; here, that the save happened and resumes exactly.
    assert "stopped by signal: checkpoint saved" in output, output[-2000:]
    stopped_at = checkpoint_step(tmp_path / "b")
    assert stopped_at > 0
    end = ["--max_steps", stopped_at + 100]

    proc = launched("horovod", 2, *common, *end, "--save_path", tmp_path / "b", "--resume",
                      "--metrics_json", tmp_path / "b.json")
    assert f"ckpt-{stopped_at}" in proc.stdout
    launched("horovod", 2, *common, *end, "--save_path", tmp_path / "a", "--metrics_json", tmp_path / "a.json")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["steps"] == b["steps"] == stopped_at + 100
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_each_rank_owns_its_gpus():
    assert local_devices.rank_gpus(0, 2, 4, per_rank=2) == [0, 1]
    assert local_devices.rank_gpus(1, 2, 4, per_rank=2) == [2, 3]
    assert local_devices.rank_gpus(2, 3, 2) == [0]  # one each by default, shared when ranks outnumber GPUs
    assert local_devices.rank_gpus(0, 1, 0) == []
    # What init pinned, as the memory monitor asks it: a lone process sees every GPU unless given K.
    assert parallel.OneProcess().owned_gpus(4) is None
    assert parallel.OneProcess(gpus_per_rank=2).owned_gpus(4) == [0, 1]
    with pytest.raises(UsageError, match=r"^--gpus_per_rank 2 with 2 rank\(s\) on this node needs 4 GPUs, but it "
                                         r"has 3; lower --gpus_per_rank or start at most 1 rank\(s\) per node$"):
        local_devices.rank_gpus(0, 2, 3, per_rank=2)


def test_a_broken_collective_becomes_one_line_with_exit_75(capsys):
    pytest.importorskip("horovod.tensorflow", reason="Horovod is not installed (bash launch/setup.sh installs it)")
    gloo = tf.errors.UnknownError(None, None, "Graph execution error:\n\nDetected at node HorovodAllgather_0:\n"
                                  "[/tmp/b/third_party/gloo/gloo/transport/tcp/pair.cc:589] Read error "
                                  "[127.0.0.1]:6529: Connection reset by peer\n\t [[{{node HorovodAllgather_0}}]]")

    def train():
        with parallel.stop_if_a_rank_is_lost(HorovodWorld(rank=1, size=2), "resume later"):
            raise gloo

    assert cli.run_main("distrnn.ptb", train) == 75
    assert capsys.readouterr().err == (
        "distrnn.ptb: error: rank 1 lost contact with the other ranks (Read error [127.0.0.1]:6529: Connection "
        "reset by peer): another rank died, hung or lost its network; resume later\n")
    # Other errors, and any error of a single process, pass through as they are.
    for world, error in ((HorovodWorld(rank=1, size=2), ValueError("x")), (parallel.OneProcess(), gloo)):
        with pytest.raises(type(error)):
            with parallel.stop_if_a_rank_is_lost(world, ""):
                raise error


def rank_pid(launcher_pid, rank):
    """The pid of the process horovodrun started as `rank` (from its environment)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != launcher_pid:
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if f"HOROVOD_RANK={rank}".encode() in env and b"distrnn.ptb" in cmdline:
                return int(entry)
    return None


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_clearly_and_the_checkpoint_resumes(corpus, tmp_path):
    """kill -9 one rank mid-run: the other stops within seconds with one line and exit 75, the
    checkpoints are left as they were, and --resume continues from the last one."""
    common = ["--config", "test", "--hidden_size", "8", "--num_steps", "3", "--batch_size", "2",
              "--max_max_epoch", "1000", "--data_path", corpus, "--checkpoint_every", "200",
              "--save_path", tmp_path / "run"]
    _, stdout, stderr, stopped_after = killed_after_first_checkpoint(
        horovodrun_command(2, *common), tmp_path / "run", lambda launcher: rank_pid(launcher, 1), timeout=120)
    output = stdout + stderr
    assert stopped_after < 60, stopped_after
    rank0 = [line[len("[0]<stderr>:"):] for line in output.splitlines() if line.startswith("[0]<stderr>:")]
    errors = [line for line in rank0 if line.startswith("distrnn.ptb: error:")]
    assert len(errors) == 1 and errors[0].startswith("distrnn.ptb: error: rank 0 lost contact with the other ranks"), \
        output[-3000:]
    assert f"the checkpoints in {tmp_path / 'run'} are intact: start the whole job again with --resume" in errors[0]
    assert not [line for line in rank0 if line.startswith("Traceback")]
    last = checkpoint_step(tmp_path / "run")
    assert last > 0

    proc = launched("horovod", 2, *common, "--resume", "--max_steps", last + 10, "--metrics_json", tmp_path / "m.json")
    assert f"ckpt-{last}" in proc.stdout
    assert json.loads((tmp_path / "m.json").read_text())["steps"] == last + 10


@pytest.mark.slow
@pytest.mark.parametrize("split", [["--batch_size", "10"],
                                   ["--global_batch_size", "20", "--virtual_devices", "3", "--placement", "pipeline"]],
                         ids=["batch_per_rank", "stacked_on_3_devices_per_rank"])
def test_mnist_two_ranks_equal_one_process_with_twice_the_batch(shared, tmp_path, split):
    """The image classifier under horovodrun: 2 ranks x 10 images compute what 1 process x 20 does
    (Adam's moments included), whatever each rank's placement."""
    common = ["--config", "stacked", "--hidden_size", "8", "--validation_size", "100", "--num_epochs", "2",
              "--data_path", shared["images"], "--seed", "3"]
    mnist = [sys.executable, "-m", "distrnn.mnist"]
    launched("horovod", 2, command=[*mnist, *map(str, common), *split, "--save_path", str(tmp_path / "two"),
                           "--metrics_json", str(tmp_path / "two.json")])
    one, one_path = one_process(shared, "mnist_batch_20", "distrnn.mnist", *common, "--batch_size", "20")
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["global_batch_size"] == one["global_batch_size"] == 20
    assert two["steps"] == one["steps"] == 50
    assert len(two["history"]) == len(one["history"]) > 0
    for a, b in zip(two["history"], one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["ranks"][0]["weights_norm"] == two["ranks"][1]["weights_norm"]
    w2, w1 = weights(tmp_path / "two"), weights(one_path)
    assert w2.keys() == w1.keys() and len(w1) == 8  # 3 layers x (kernel, bias), the dense layer's w and b
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=1e-6, err_msg=name)
