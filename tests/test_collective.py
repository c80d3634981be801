"""TensorFlow's own collectives as the engine (`--engine tensorflow`): real worker processes joined by
TF_CONFIG through `python -m distrnn.launch`, on whichever stack runs the test (both in CI: this is the one
way distrnn trains on several processes on TensorFlow 2.19 and newer)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (ENGINES, HOROVODRUN, ROOT, assert_one_line_error, checkpoint_step, killed_after_first_checkpoint,
                      launched, run_module, signalled_at_first_progress, subprocess_env, write_corpus)
from distrnn.errors import UsageError
from distrnn.parallel import collective, slurm_env
from distrnn.parallel.collective import free_ports, tf_configs
from distrnn.run import faults

PTB = ["--config", "test", "--hidden_size", "8", "--num_layers", "2", "--num_steps", "5", "--max_max_epoch", "2",
       "--max_epoch", "1", "--keep_prob", "1.0", "--max_grad_norm", "5", "--learning_rate", "0.2", "--seed", "3"]


def tf_config(workers, index, role="worker", **more):
    return json.dumps({"cluster": dict({"worker": workers}, **more), "task": {"type": role, "index": index}})


def test_tf_config_as_tf_distribute_and_kubeflow_write_it():
    task = collective.read_tf_config(tf_config(["a:1000", "b:1000", "a:1001"], 2))
    assert (task.rank, task.size, task.host, task.port, task.local_rank, task.local_size) == (2, 3, "a", 1001, 1, 2)
    # A TFJob's chief is rank 0, its workers follow.
    task = collective.read_tf_config(tf_config(["w0:2222", "w1:2222"], 0, chief=["c0:2222"]))
    assert (task.rank, task.size, task.role) == (1, 3, "worker")
    assert collective.read_tf_config(tf_config(["w0:2222"], 0, role="chief", chief=["c0:2222"])).rank == 0


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG has no cluster or no task"),
    (tf_config(["a:1"], 0, ps=["p:1"]), "TF_CONFIG's cluster has ps tasks: distrnn trains with chief and worker"),
    (tf_config(["a:1", "b:1"], 2), "TF_CONFIG's task index 2 is not one of the cluster's 2 worker task(s) (0 to 1)"),
    (tf_config(["a:1"], True), "TF_CONFIG's task index True is not one of"),
    (tf_config(["a:1"], 0, role="evaluator"), "TF_CONFIG's task type is 'evaluator'"),
    (tf_config(["a"], 0), 'cluster.worker must be a list of "host:port" strings'),
    (tf_config(["a:99999"], 0), 'cluster.worker must be a list of "host:port" strings'),
    (tf_config(["a:1", "a:1"], 0), "names one host:port twice"),
])
def test_a_malformed_tf_config_is_one_line(text, fragment):
    with pytest.raises(UsageError) as raised:
        collective.read_tf_config(text)
    assert fragment in str(raised.value)


def test_tasks_meet_though_other_callers_dial_their_ports_first():
    """A task that has met all starts TensorFlow's gRPC at once, whose client dials the tasks still meeting
    (HTTP/2 opens with "PRI * HTTP/2.0"): the slower task reads only greetings, and still meets (a CI run read
    those bytes as a rank and waited out DISTRNN_JOIN_TIMEOUT)."""
    ports = free_ports(3)
    tasks = [collective.Task(rank, tuple(f"127.0.0.1:{p}" for p in ports), "worker", rank) for rank in range(3)]
    errors = []

    def meet(task):
        try:
            collective.meet(task, seconds=10)
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    # The stranger dials task 0's port before task 0 listens, so it is in the queue with the greetings.
    junk = threading.Thread(target=_dial_until_heard, args=(ports[0], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    threads = [junk, *(threading.Thread(target=meet, args=(task,)) for task in tasks[1:])]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    meet(tasks[0])
    for thread in threads:
        thread.join(timeout=40)
    assert errors == []


def _dial_until_heard(port, data, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
                connection.sendall(data)
                return
        except OSError:
            time.sleep(0.05)


def test_srun_tasks_get_a_cluster_whose_ports_two_steps_on_a_node_do_not_share():
    env = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NODELIST": "n[1-2]",
           "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_PROCID": "2"}
    config = json.loads(collective.srun_tf_config(slurm_env.srun_task(env), env))
    base = int(config["cluster"]["worker"][0].split(":")[1])
    assert config == {"cluster": {"worker": [f"n1:{base}", f"n1:{base + 1}", f"n2:{base}"]},
                      "task": {"type": "worker", "index": 2}}
    other = json.loads(collective.srun_tf_config(slurm_env.srun_task(env), dict(env, SLURM_JOB_ID="78")))
    assert {a.split(":")[1] for a in other["cluster"]["worker"]}.isdisjoint({str(base), str(base + 1)})


def launch(nproc, *args, module="distrnn.ptb"):
    return launched("tensorflow", nproc, *args, module=module)


@pytest.fixture(scope="module")
def ptb_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("collective") / "corpus", train_words=2000, other_words=600)


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_equal_one_process_with_the_whole_batch(ptb_corpus, tmp_path, workers):
    """N workers of --global_batch_size 6 compute what one process of batch 6 does, dropout included (a row's
    mask depends on its place in the global batch), at a learning rate where training is not chaotic: train
    perplexity to 1e-5, valid and test to 1e-4 (float32 sums in another order), two epochs (the learning
    rate's decay in the second)."""
    common = [*PTB, "--data_path", ptb_corpus, "--keep_prob", "0.7"]
    proc = launch(workers, *common, "--global_batch_size", 6, "--save_path", tmp_path / "n",
                  "--metrics_json", tmp_path / "n.json")
    run_module("distrnn.ptb", *common, "--batch_size", 6, "--save_path", tmp_path / "one",
               "--metrics_json", tmp_path / "one.json", check=0)
    many, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("n", "one"))
    assert (many["engine"], many["collectives"], many["world_size"]) == ("tensorflow", "RING", workers)
    assert (one["engine"], one["world_size"]) == ("one process", 1)
    assert many["steps"] == one["steps"] > 0 and len(many["history"]) == len(one["history"]) == 2
    for a, b in zip(many["history"], one["history"]):
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-5)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-4)
    assert many["test_perplexity"] == pytest.approx(one["test_perplexity"], rel=1e-4)
    assert len({rank["weights_norm"] for rank in many["ranks"]}) == 1  # every replica holds the same weights
    assert f"engine: tensorflow (RING collectives), {workers} process(es)" in proc.stdout
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports


def test_gradients_travel_as_the_engine_says():
    """The embedding's IndexedSlices travel as one all-gather, each index's 8 bytes as columns beside its row:
    indices past 2^32 arrive bit for bit, rows in rank order and averaged, in float32, float16 on the wire
    (--fp16_allreduce) and float64. Dense gradients go as one vector in pieces of at most PIECE_BYTES (16 bytes
    here): 24 floats as 6 all-reduces (3 in float16), every sum exact. broadcast_variables gives every rank
    rank 0's values, whatever their types."""
    proc = launched("tensorflow", 2, command=[sys.executable, os.path.join(ROOT, "tests", "average_gradients.py")])
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    rows = [[[r + 1.0, 0.5], [-2.0, r * 4.0], [1.0, 1.0]] for r in (0, 1)]
    expected_rows = [[value / 2 for value in row] for rank_rows in rows for row in rank_rows]
    expected_indices = [2**40, 7, 2**33 - 1, 2**40 + 1, 7, 2**33 - 2]
    for name, dtype in (("float32", "float32"), ("float32-fp16", "float32"), ("float64", "float64")):
        assert got["gathered"][name] == {"rows": expected_rows, "indices": expected_indices, "dtype": dtype}, name
    expected_sums = [[[(i + 5 * row) * 1.5 for i in range(5)] for row in range(3)], [1.0] * 7, [1.0, -3.0]]
    for name, pieces in (("float32", 6), ("fp16", 3)):  # a float16 is 2 bytes: 8 to a piece
        assert got["pieces"][name] == {"sums": expected_sums, "collectives": pieces}, name
    rank0 = [[[1.5] * 5] * 3, 7, [0.25, 0.0]]
    assert got["broadcast"] == [rank0, rank0]


def test_mnist_two_workers_equal_one_process(tmp_path):
    from conftest import write_images
    images = write_images(tmp_path / "images")
    common = ["--config", "stacked", "--hidden_size", "8", "--validation_size", "100", "--num_epochs", "1",
              "--data_path", images, "--seed", "3", "--virtual_devices", "2"]
    launch(2, *common, "--global_batch_size", 20, "--save_path", tmp_path / "two",
           "--metrics_json", tmp_path / "two.json", module="distrnn.mnist")
    run_module("distrnn.mnist", *common, "--batch_size", 20, "--save_path", tmp_path / "one",
               "--metrics_json", tmp_path / "one.json", check=0)
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["steps"] == one["steps"] == 25
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert two["confusion_matrix"] == one["confusion_matrix"]


def test_the_engine_is_chosen_as_asked(tmp_path, ptb_corpus):
    """--engine tensorflow with nothing to join, a malformed TF_CONFIG, a task's port already taken: one line,
    exit 2, before any training."""
    base = ["--config", "test", "--data_path", ptb_corpus, "--max_steps", "1", "--save_path", tmp_path / "run"]
    proc = run_module("distrnn.ptb", *base, "--engine", "tensorflow")
    assert_one_line_error(proc, "distrnn.ptb", "--engine tensorflow: no TF_CONFIG and no srun step")
    proc = run_module("distrnn.ptb", *base, env={"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]}, "task": 3}'})
    assert_one_line_error(proc, "distrnn.ptb", "TF_CONFIG has no cluster or no task")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = run_module("distrnn.ptb", *base, env={"TF_CONFIG": tf_config([f"localhost:{port}"], 0)})
    assert_one_line_error(proc, "distrnn.ptb", f"port {port} of this host (worker 0 in TF_CONFIG) is taken")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("who", ["chief", "worker", "srun"])
def test_a_job_whose_other_tasks_never_start_ends_in_one_line_not_a_hang(ptb_corpus, tmp_path, who, monkeypatch):
    """TensorFlow's runtime waits for every task of the cluster without end; distrnn gives the job
    DISTRNN_JOIN_TIMEOUT seconds to meet, then one line and exit 75, nothing written. srun: a task of a
    2-task step where Horovod does not load joins through TensorFlow's collectives (auto)."""
    from conftest import hide_horovod
    ports = free_ports(2)
    env = {"DISTRNN_JOIN_TIMEOUT": "8"}
    if who == "srun":
        hide_horovod(tmp_path, monkeypatch)
        env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_LOCALID": "1",
                    "SLURM_PROCID": "1", "SLURM_JOB_ID": "7", "DISTRNN_RENDEZVOUS_PORT": str(ports[0])})
    else:
        env["TF_CONFIG"] = tf_config([f"localhost:{p}" for p in ports], 0 if who == "chief" else 1)
    started = time.monotonic()
    proc = run_module("distrnn.ptb", "--config", "test", "--data_path", ptb_corpus, "--save_path", tmp_path / "run",
                      env=env, timeout=120)
    assert time.monotonic() - started < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 75 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("distrnn.ptb: error: worker ") and "did not meet 1 of the other 1 task(s)" in lines[0]
    assert "within 8 s" in lines[0] and "DISTRNN_JOIN_TIMEOUT" in lines[0]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("frozen, how", [(1, "hang"), (1, "SIGSTOP"), (0, "SIGSTOP")])
def test_a_worker_that_hangs_or_is_stopped_ends_the_others_in_one_line(ptb_corpus, tmp_path, frozen, how):
    """A worker stuck alive (a read that never returns, a deadlock: DISTRNN_FAULT's hang) still answers the
    heartbeats, so the others' collective times out (DISTRNN_COLLECTIVE_TIMEOUT); a stopped one (kill -STOP,
    rank 0 holding the coordination service or not) misses them. Either way the others end with exit 75 and
    one line of distrnn's, the last checkpoint intact, instead of waiting for ever."""
    save_path = tmp_path / "run"
    command = [sys.executable, "-m", "distrnn.ptb", *PTB, "--data_path", ptb_corpus, "--save_path", save_path,
               "--checkpoint_every", "2", "--max_steps", "100000"]
    workers = []
    try:
        for rank, config in enumerate(tf_configs(free_ports(2))):
            fault = {faults.VARIABLE: "step:5:hang"} if rank == frozen and how == "hang" else {}
            env = subprocess_env(TF_CONFIG=config, DISTRNN_COLLECTIVE_TIMEOUT="8", **fault)
            workers.append(subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
        if how == "SIGSTOP":
            wait_for_file(save_path / "checkpoints" / "checkpoint", workers)
            os.kill(workers[frozen].pid, signal.SIGSTOP)
        _, stderr = workers[1 - frozen].communicate(timeout=240)
        assert workers[frozen].poll() is None  # still stuck: a launcher or srun ends it
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    lines = [line for line in stderr.splitlines() if line.startswith("distrnn")]
    assert workers[1 - frozen].returncode == 75 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"distrnn.ptb: error: rank {1 - frozen} lost contact with the "
                                                   f"other ranks ("), stderr[-3000:]
    assert lines[0].endswith(f"): another rank died, hung or lost its network; the checkpoints in {save_path} are "
                             f"intact: start the whole job again with --resume")
    if how == "hang":
        assert "(Collective has timed out during execution)" in lines[0]
        assert checkpoint_step(save_path) == 4  # the 5th step never ran
    else:
        assert checkpoint_step(save_path) >= 2


def wait_for_file(path, processes, seconds=180):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), f"no {path}"
        time.sleep(0.2)


def test_rank_0s_slow_save_is_waited_for_not_taken_for_a_hang(ptb_corpus, tmp_path):
    """Rank 0 saves while the others wait: a save slower than the collective timeout (a slow disk) is waited
    for at a barrier of its own, not counted as a hung worker."""
    launched("tensorflow", 2, *PTB, "--data_path", ptb_corpus, "--save_path", tmp_path / "run", "--checkpoint_every", 2,
             "--max_steps", 4, env={"DISTRNN_COLLECTIVE_TIMEOUT": "8", faults.VARIABLE: "checkpoint:1:sleep@20"})
    assert checkpoint_step(tmp_path / "run") == 4


@pytest.mark.slow
def test_a_killed_worker_ends_the_others_with_75_and_the_run_resumes(ptb_corpus, tmp_path):
    """kill -9 of one of two workers mid-run: the other ends within 60 s with one line and exit 75 (the
    runtime's heartbeats, not a hang), the checkpoints stay as they were, and --resume goes on from the last."""
    common = [*PTB, "--max_max_epoch", "1000", "--data_path", ptb_corpus, "--batch_size", "2",
              "--checkpoint_every", "100", "--save_path", tmp_path / "run"]
    code, _, stderr, stopped_after = killed_after_first_checkpoint(
        [sys.executable, "-m", "distrnn.launch", "--nproc", "2", "-m", "distrnn.ptb", *map(str, common)],
        tmp_path / "run", lambda launcher: worker_pid(launcher, 1))
    assert stopped_after < 60, stopped_after
    errors = [line for line in stderr.splitlines() if line.startswith("distrnn.ptb: error:")]
    assert len(errors) == 1 and "rank 0 lost contact with the other ranks" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert code in (75, 137), code  # the first to fail: the survivor's 75 or the victim's kill
    last = checkpoint_step(tmp_path / "run")
    resumed = launch(2, *common, "--resume", "--max_steps", last + 10, "--metrics_json", tmp_path / "m.json")
    assert f"ckpt-{last}" in resumed.stdout
    assert json.loads((tmp_path / "m.json").read_text())["steps"] == last + 10


def worker_pid(launcher: int, index: int) -> int:
    """The pid of the launcher's child whose TF_CONFIG has task index `index`."""
    import psutil
    for child in psutil.Process(launcher).children():
        config = json.loads(child.environ().get("TF_CONFIG", "{}"))
        if config.get("task", {}).get("index") == index:
            return child.pid
    raise AssertionError(f"no worker {index} under pid {launcher}")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_to_the_launcher_stops_every_worker_at_one_step_and_resumes_exactly(ptb_corpus, tmp_path, engine):
    """A scheduler's SIGTERM to python -m distrnn.launch reaches every worker once; they agree on the step,
    rank 0 saves (every worker's carried LSTM state and the dropout generator included), each exits 143, and
    --resume continues as the uninterrupted run. An elastic launcher (--max_restarts) stops too: a signal is a
    stop, never a restart. Either engine under the launcher."""
    if engine == "horovod" and HOROVODRUN is None:
        pytest.skip("Horovod is not installed on this stack (TensorFlow 2.19 and newer)")
    common = [*PTB, "--keep_prob", "0.8", "--batch_size", "2", "--max_max_epoch", "1000000", "--data_path",
              ptb_corpus, "--checkpoint_every", "100000"]
    code, output = signalled_at_first_progress(
        [sys.executable, "-m", "distrnn.launch", "--engine", engine, "--nproc", "2", "--max_restarts", "3", "-m", "distrnn.ptb",
         *map(str, common),
         "--save_path", str(tmp_path / "b")])
    assert code == 143 and "stopped by signal: checkpoint saved" in output, output[-2000:]
    assert "go on from the last checkpoint" not in output
    stopped_at = checkpoint_step(tmp_path / "b")
    end = ["--max_steps", stopped_at + 60]
    resumed = launched(engine, 2, *common, *end, "--save_path", tmp_path / "b", "--resume", "--metrics_json", tmp_path / "b.json")
    assert f"ckpt-{stopped_at}" in resumed.stdout
    launched(engine, 2, *common, *end, "--save_path", tmp_path / "a", "--metrics_json", tmp_path / "a.json")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["steps"] == b["steps"] == stopped_at + 60
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key


@pytest.mark.slow
def test_the_two_engines_compute_the_same(ptb_corpus, tmp_path):
    """The same job under horovodrun and under TensorFlow's collectives, 2 processes each: the same
    perplexities to 1e-5 (measured: the same bits)."""
    common = [*PTB, "--data_path", ptb_corpus, "--global_batch_size", 4]
    for engine, name in (("horovod", "hvd"), ("tensorflow", "tf")):  # skipped at once where Horovod is missing
        launched(engine, 2, *common, "--save_path", tmp_path / name, "--metrics_json", tmp_path / f"{name}.json")
    tf_run, hvd_run = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tf", "hvd"))
    assert (tf_run["engine"], hvd_run["engine"]) == ("tensorflow", "horovod")
    for key in ("train_perplexity", "valid_perplexity", "test_perplexity"):
        assert tf_run[key] == pytest.approx(hvd_run[key], rel=1e-5), key
