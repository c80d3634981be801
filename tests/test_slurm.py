"""Slurm: its node lists and task counts, srun tasks joining through Horovod's Gloo rendezvous, the
launch/ scripts, and the sbatch scripts run on a real Slurm cluster (tests/slurm_cluster.py): one
node on 127.0.0.1, and two nodes in two network namespaces."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import slurm_cluster
from conftest import ROOT, checkpoint_step, run_module, run_ptb, subprocess_env, write_corpus, write_images
from distrnn.errors import UsageError
from distrnn.parallel import horovod, slurm_env, srun



# --- node lists and task counts ------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, names", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node1", ["node1"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[09-11]", ["n09", "n10", "n11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1,3],b-[2-3].ib", ["a1", "a3", "b-2.ib", "b-3.ib"]),
])
def test_node_lists_expand_as_slurm_writes_them(nodelist, names):
    assert slurm_env.expand_nodelist(nodelist) == names


@pytest.mark.parametrize("nodelist, problem", [("gpu[3-1]", "bad range '3-1'"), ("gpu[]", "bad range ''"),
                                               ("gpu[1-2", "unbalanced"), ("gpu]1", "unbalanced"),
                                               ("gpu[a]", "bad range 'a'"), ("", "expected names")])
def test_bad_node_lists_are_refused_with_the_problem(nodelist, problem):
    with pytest.raises(UsageError, match=re.escape(problem)):
        slurm_env.expand_nodelist(nodelist)


def test_task_counts_expand_their_repeats():
    assert slurm_env.expand_tasks_per_node("4(x2),2") == [4, 4, 2]
    assert slurm_env.expand_tasks_per_node("1(x3)") == [1, 1, 1]
    assert slurm_env.expand_tasks_per_node("8") == [8]
    for bad in ("4(x)", "0", "x2", "4,,2"):
        with pytest.raises(UsageError, match="cannot read the Slurm task counts"):
            slurm_env.expand_tasks_per_node(bad)


def test_horovodrun_host_lists_from_the_allocation():
    job = {"SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5"}
    assert slurm_env.horovod_hosts(dict(job, SLURM_NTASKS_PER_NODE="4")) == "gpu01:4,gpu02:4,gpu03:4,gpu07:4,cpu5:4"
    assert (slurm_env.horovod_hosts(dict(job, SLURM_TASKS_PER_NODE="4(x2),2(x2),1", SLURM_NTASKS_PER_NODE="4"))
            == "gpu01:4,gpu02:4,gpu03:2,gpu07:2,cpu5:1")  # the per-node counts win
    # Inside a step, the step's own nodes and counts.
    step = dict(job, SLURM_TASKS_PER_NODE="4(x5)", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_STEP_TASKS_PER_NODE="2,1")
    assert slurm_env.horovod_hosts(step) == "gpu01:2,gpu02:1"
    with pytest.raises(UsageError, match=r"lists 5 node\(s\) but task counts for 2"):
        slurm_env.horovod_hosts(dict(job, SLURM_TASKS_PER_NODE="4,4"))
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST is not set: run this inside a Slurm allocation"):
        slurm_env.horovod_hosts({})
    with pytest.raises(UsageError, match="--ntasks-per-node"):
        slurm_env.horovod_hosts(job)


def test_a_step_runs_the_tasks_its_nodes_hold_that_split_the_global_batch():
    """slurm/job.sh's srun: as many tasks a node as the allocation has, fewer where the global batch would not
    split evenly (ptb_large.sh's 20 rows on 3 nodes of 4 tasks: 10), after a lost node on the nodes left."""
    command = ["python", "-m", "distrnn.ptb", "--global_batch_size", "20"]
    assert slurm_env.step_tasks(1, command, {"SLURM_NTASKS_PER_NODE": "4"}) == (4, "")
    assert slurm_env.step_tasks(3, command, {"SLURM_NTASKS_PER_NODE": "4"}) == (
        10, "10 of the 12 tasks 3 node(s) hold: the global batch of 20 splits evenly over 10")
    assert slurm_env.step_tasks(2, command[:3], {"SLURM_TASKS_PER_NODE": "3(x2)"}) == (6, "")
    assert slurm_env.step_tasks(2, [*command, "--global_batch_size=6"], {"SLURM_TASKS_PER_NODE": "2(x2)"})[0] == 3
    with pytest.raises(UsageError, match="SLURM_NTASKS_PER_NODE"):
        slurm_env.step_tasks(1, command, {"SLURM_NTASKS_PER_NODE": "four"})


def test_the_helper_command_prints_hosts_and_count_or_one_line_errors():
    env = subprocess_env(SLURM_JOB_NODELIST="gpu[01-02],cpu5", SLURM_TASKS_PER_NODE="4(x2),2")
    command = [sys.executable, "-m", "distrnn.slurm"]
    hosts = subprocess.run([*command, "hosts"], env=env, capture_output=True, text=True)
    count = subprocess.run([*command, "np"], env=env, capture_output=True, text=True)
    assert (hosts.returncode, hosts.stdout) == (0, "gpu01:4,gpu02:4,cpu5:2\n")
    assert (count.returncode, count.stdout) == (0, "10\n")
    tasks = subprocess.run([*command, "tasks", "2", "python", "-m", "distrnn.ptb", "--global_batch_size", "6"], env=env,
                           capture_output=True, text=True)
    assert (tasks.returncode, tasks.stdout) == (0, "6\n")  # 4 a node (the first node's count), 6 of 8
    assert tasks.stderr == "[slurm] 6 of the 8 tasks 2 node(s) hold: the global batch of 6 splits evenly over 6\n"
    tasks = subprocess.run([*command, "tasks", "0", "x"], env=env, capture_output=True, text=True)
    assert tasks.returncode == 2 and tasks.stderr.count("\n") == 1 and "must be >= 1" in tasks.stderr
    outside = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run([*command, "hosts"], env=outside, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("python -m distrnn.slurm: error: SLURM_JOB_NODELIST is not set: run this inside a "
                           "Slurm allocation (sbatch, salloc or srun)\n")


def test_the_sbatch_header_is_read_as_sbatch_reads_it():
    script = ("#!/bin/bash\n# a comment\n#SBATCH --nodes=1\n#SBATCH --cpus-per-task 8\n\n#SBATCH --requeue\n"
              "#SBATCH --gpus-per-node=a100:4\n#SBATCH -t 5\necho go\n#SBATCH --time=9:00\n")
    assert slurm_env.sbatch_header(script) == {"nodes": "1", "cpus-per-task": "8", "requeue": "",
                                                "gpus-per-node": "a100:4"}
    with open(os.path.join(ROOT, "slurm", "ptb_large.sh")) as f:
        header = slurm_env.sbatch_header(f.read())
    assert {k: header[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time")} == {
        "nodes": "1", "ntasks-per-node": "4", "gpus-per-node": "4", "cpus-per-task": "8", "time": "24:00:00"}


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("30:00", 1800), ("1:30", 90), ("24:00:00", 86400),
                                            ("1-0", 86400), ("1-00:00:00", 86400), ("2-3:04", 183840),
                                            ("UNLIMITED", None), ("", None), ("1:2:3:4", None)])
def test_slurm_times(limit, seconds):
    assert slurm_env.time_seconds(limit) == seconds


def test_an_allocation_unlike_its_header_is_named_request_by_request(tmp_path):
    header = {"nodes": "1", "ntasks-per-node": "4", "gpus-per-node": "a100:4", "cpus-per-task": "8", "time": "24:00:00"}
    asked = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_PER_NODE": "4",
             "SLURM_CPUS_PER_TASK": "8"}
    assert slurm_env.header_differences(header, asked, "1-00:00:00") == []
    cpu_cluster = dict(asked, SLURM_NTASKS_PER_NODE="2", SLURM_GPUS_PER_NODE="0", SLURM_CPUS_PER_TASK="1")
    assert slurm_env.header_differences(header, cpu_cluster, "30:00") == [
        "--ntasks-per-node 2 (header: 4)", "--cpus-per-task 1 (header: 8)", "--gpus-per-node 0 (header: a100:4)",
        "--time 30:00 (header: 24:00:00)"]
    assert slurm_env.header_differences(header, {}, None) == []  # nothing known, nothing said
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --cpus-per-task=8\nsrun true\n")
    env = subprocess_env(SLURM_CPUS_PER_TASK="2")
    proc = subprocess.run([sys.executable, "-m", "distrnn.slurm", "header", script], env=env, capture_output=True,
                          text=True)
    assert (proc.returncode, proc.stdout) == (0, "[slurm] this allocation is not what the script's #SBATCH header "
                                                 "asks for: --cpus-per-task 2 (header: 8); the hardware, time and "
                                                 "figures its header comment states assume the header\n")
    for args, error in ((["header", tmp_path / "none.sh"], "cannot read the batch script"),
                        (["bogus"], "invalid choice: 'bogus'")):
        proc = subprocess.run([sys.executable, "-m", "distrnn.slurm", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and error in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- srun tasks as Horovod processes -------------------------------------------------------------
def step_env(procid, nodeid, localid, nodes="gpu[01-03]", counts="4(x2),2", **more):
    return dict(SLURM_STEP_ID="0", SLURM_JOB_ID="1234", SLURM_STEP_NODELIST=nodes, SLURM_STEP_TASKS_PER_NODE=counts,
                SLURM_STEP_NUM_TASKS=str(sum(slurm_env.expand_tasks_per_node(counts))), SLURM_PROCID=str(procid),
                SLURM_NODEID=str(nodeid), SLURM_LOCALID=str(localid), **more)


def test_srun_tasks_are_laid_out_as_horovodrun_lays_out_processes():
    # 4 + 4 + 2 tasks: local rank 1 exists on all three nodes, local rank 3 on the first two.
    task = slurm_env.srun_task(step_env(procid=9, nodeid=2, localid=1))
    assert task == slurm_env.SrunTask(rank=9, size=10, local_rank=1, local_size=2, cross_rank=2, cross_size=3,
                                  node="gpu03", slots=(("gpu01", 4), ("gpu02", 4), ("gpu03", 2)))
    task = slurm_env.srun_task(step_env(procid=7, nodeid=1, localid=3))
    assert (task.local_size, task.cross_rank, task.cross_size, task.node) == (4, 1, 2, "gpu02")
    assert task.hosts == "gpu01:4,gpu02:4,gpu03:2"
    # Not a task of a step of several: a batch script, a one-task step, a plain shell.
    assert slurm_env.srun_task({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a"}) is None
    assert slurm_env.srun_task(step_env(0, 0, 0, nodes="a", counts="1")) is None
    assert slurm_env.srun_task({}) is None


def test_srun_environment_names_the_rendezvous_and_the_interface_towards_it():
    env = step_env(procid=5, nodeid=1, localid=1, DISTRNN_RENDEZVOUS_ADDR="127.0.0.1")
    task = slurm_env.srun_task(env)
    assert horovod.gloo_environment(task, env) == {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(20000 + 1234 * 101 % 10000),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "lo",
        "HOROVOD_HOSTNAME": "gpu02", "HOROVOD_RANK": "5", "HOROVOD_SIZE": "10", "HOROVOD_LOCAL_RANK": "1",
        "HOROVOD_LOCAL_SIZE": "4", "HOROVOD_CROSS_RANK": "1", "HOROVOD_CROSS_SIZE": "3"}
    # Ports: the one given, else the step's reserved ports (srun --resv-ports), else from the ids.
    assert srun.rendezvous_port(dict(env, SLURM_STEP_RESV_PORTS="12000-12003")) == 12000
    assert srun.rendezvous_port(dict(env, DISTRNN_RENDEZVOUS_PORT="4567")) == 4567
    assert srun.rendezvous_port(dict(env, SLURM_STEP_ID="1")) == 20000 + (1234 * 101 + 1) % 10000
    # A one-node step meets on loopback; several nodes at the first node's resolved name.
    one_node = slurm_env.srun_task(step_env(1, 0, 1, nodes="gpu01", counts="2"))
    assert srun.rendezvous_address(one_node, {}) == "127.0.0.1"
    here = socket.gethostname()
    two = slurm_env.srun_task(step_env(1, 1, 0, nodes=f"{here},other", counts="1(x2)"))
    assert srun.rendezvous_address(two, {}) == socket.getaddrinfo(here, None, socket.AF_INET)[0][4][0]
    unknown = slurm_env.srun_task(step_env(1, 1, 0, nodes="no-such-node-x[1-2]", counts="1(x2)"))
    with pytest.raises(UsageError, match="cannot resolve the node name no-such-node-x1 .* set DISTRNN_RENDEZVOUS_ADDR"):
        srun.rendezvous_address(unknown, {})
    misplaced = slurm_env.srun_task(step_env(0, 1, 0, nodes="a[1-2]", counts="1(x2)"))
    with pytest.raises(UsageError, match="rank 0 runs on a2, not on the step's first node a1"):
        srun.rendezvous_address(misplaced, {})


TWO_TASKS = """
import os, sys, time
from distrnn import parallel
world = parallel.init()
total = world.allreduce_sum([world.rank + 1])
print(world.rank, world.size, world.local_rank, int(total[0]), os.environ["HOROVOD_GLOO_IFACE"], flush=True)
"""


@pytest.mark.parametrize("mpi", [{}, {"PMIX_RANK": "0"}], ids=["srun", "srun_mpi_pmix"])
def test_srun_tasks_join_without_a_launcher_in_any_order(mpi):
    """Two processes with what srun sets (no horovodrun, no ssh): rank 1 starts 3 s before rank 0 serves
    the rendezvous, and waits for it (Horovod alone gives up after a few quick tries). With
    srun --mpi=pmix and a Horovod without MPI (this one), the tasks still meet through Gloo."""
    port = slurm_cluster.free_port()
    env = lambda rank: dict(subprocess_env(), **step_env(rank, 0, rank, nodes="localhost", counts="2"),  # noqa: E731
                            DISTRNN_RENDEZVOUS_PORT=str(port), **mpi)
    late = subprocess.Popen([sys.executable, "-c", TWO_TASKS], env=env(1), stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    first = subprocess.run([sys.executable, "-c", TWO_TASKS], env=env(0), capture_output=True, text=True, timeout=120)
    out1, _ = late.communicate(timeout=120)
    assert first.returncode == 0 and late.returncode == 0, first.stderr[-2000:]
    assert first.stdout.split() == ["0", "2", "0", "3", "lo"]
    assert out1.split() == ["1", "2", "1", "3", "lo"]


def test_an_mpi_launch_without_mpi_in_horovod_is_refused(corpus, tmp_path):
    """mpirun (or srun --mpi outside a step) with a Horovod without MPI would start N jobs of one."""
    if not horovod.version():
        pytest.skip("Horovod is not installed")
    import horovod.tensorflow as hvd
    if hvd.mpi_built():
        pytest.skip("this Horovod has MPI, so an MPI launch is valid")
    proc = run_ptb("--config", "test", "--data_path", corpus, "--save_path", tmp_path / "run",
                   env={"OMPI_COMM_WORLD_RANK": "0"}, check=2)
    assert proc.stderr == ("distrnn.ptb: error: started by an MPI launcher, but this Horovod was built without MPI: "
                           "start with horovodrun --gloo, or srun without --mpi\n")


# --- launch/ scripts -------------------------------------------------------------------------
def test_launch_scripts_refuse_bad_usage_with_one_line(tmp_path):
    for script, args in (("one_node.sh", []), ("one_node.sh", ["x", "-m", "distrnn.ptb"]), ("hostfile.sh", ["x"])):
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith(f"usage: bash launch/{script}"), proc.stderr
        assert proc.stderr.count("\n") == 1
    (tmp_path / "letters").write_text("gpu01 slots=4\ngpu02 slots=abc\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00 slots=1\n")
    (tmp_path / "empty").write_text("# no node\n\n")
    for name, fragment in (("nowhere", "cannot read the host file"), ("", "cannot read the host file"),
                           ("letters", "letters, line 2: gpu02 slots=abc: expected 'NAME slots=N'"),
                           ("binary", "binary, line 1:"), ("empty", "lists no node")):
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "hostfile.sh"), str(tmp_path / name), "-m",
                               "distrnn.ptb"], capture_output=True, text=True, errors="replace")
        assert proc.returncode == 2 and proc.stderr.startswith("hostfile.sh: error: "), proc.stderr
        assert fragment in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_hostfile_launch_trains_one_process_per_slot(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# this machine\nlocalhost slots=2\n\n")
    corpus = write_corpus(tmp_path / "data")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "hostfile.sh"), str(hosts), "-m", "distrnn.ptb",
                           "--config", "test", "--data_path", corpus, "--max_steps", "5", "--save_path",
                           tmp_path / "run", "--metrics_json", tmp_path / "m.json"],
                          env=subprocess_env(DISTRNN_PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 5


# --- a real Slurm ---------------------------------------------------------------------------
# A tiny large-preset run on CPUs: the header's GPU request cleared on the command line, 2 tasks
# of 1 core. keep_prob 1 so that a single process can reproduce it exactly.
CPU_JOB = ["--gres=none", "--gpus-per-node=0", "--cpus-per-task=1"]
TINY = ["--hidden_size", "16", "--num_steps", "5", "--keep_prob", "1.0", "--checkpoint_every", "100"]
STEPS = 300


def skip_without_slurm(netns=False):
    reason = slurm_cluster.missing() or (netns and slurm_cluster.netns_missing())
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    skip_without_slurm()
    with slurm_cluster.SlurmCluster([socket.gethostname().split(".")[0]]) as c:
        yield c
    c.remove()


@pytest.fixture(scope="module")
def two_node_cluster():
    skip_without_slurm(netns=True)
    with slurm_cluster.SlurmCluster(["n1", "n2"], netns=True) as c:
        yield c
    c.remove()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A submit directory (logs/ for --output=logs/%x-%j.out, runs/ for the save paths) with a corpus,
    and another for the two-node cluster, whose job ids start at 1 again."""
    path = tmp_path_factory.mktemp("slurm")
    for directory in (path, path / "two_nodes"):
        (directory / "logs").mkdir(parents=True)
    write_corpus(path / "data", train_words=20000)
    return path


def reference_run(job_dir, steps, *flags, python=sys.executable, name="reference"):
    """The metrics of one process training what the jobs train (the large preset, global batch 20,
    TINY and `flags`) for `steps` steps, uninterrupted (on the stack of `python`)."""
    out = job_dir / f"{name}-{steps}.json"
    run_module("distrnn.ptb", "--config", "large", "--global_batch_size", "20", *TINY, *flags, "--data_path",
               job_dir / "data", "--max_steps", steps, "--save_path", job_dir / f"{name}-{steps}", "--metrics_json",
               out, check=0, python=python)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(job_dir):
    return reference_run(job_dir, STEPS)


def job_env():
    return {"DISTRNN_ROOT": ROOT, "DISTRNN_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}


def log_of(job_dir, name, job_id):
    path = job_dir / "logs" / f"{name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


def wait_for_progress(cluster, job_dir, job_id, start, timeout=300):
    """Waits for a progress line of the job's start-th start (the log holds every start's lines)."""
    def progressed():
        log = log_of(job_dir, "ptb_large", job_id)
        marker = f"(ptb_large) start {start} on"
        return marker in log and re.search(r"step \d+/\d+ \(", log.split(marker, 1)[1])
    cluster.wait_for(progressed, timeout, f"progress in start {start} of job {job_id}:\n"
                                          f"{log_of(job_dir, 'ptb_large', job_id)[-2000:]}")


def wait_until_requeued(cluster, job_id, restarts):
    """Waits until the job is back in the queue after its restarts-th requeue, its node idle again."""
    cluster.wait_for(lambda: cluster.job(job_id).get("Restarts") == str(restarts)
                     and cluster.job(job_id)["JobState"] == "PENDING", 300, f"job {job_id} requeued")
    cluster.wait_for(lambda: cluster.idle_nodes() == len(cluster.nodes), 300, "the node to finish the previous run")


def release(cluster, job_id):
    """Lets a requeued job start now. Slurm holds a requeued job for two minutes (BeginTime), or for good
    after `scontrol requeuehold`, because slurmd revokes the credential of the run it killed: a new run
    whose credential is made in the same second as that revocation counts as revoked too and is killed at
    once ("Killing non-startable batch JobId=1: Job credential revoked"; twice in a row here when the
    release came within the second). So, once wait_until_requeued saw the node idle: two seconds more."""
    time.sleep(2)
    cluster.command("scontrol", "release", job_id, check=False)  # refused (harmless) where it is not held
    cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")


@pytest.mark.slow
def test_sbatch_ptb_large_stops_before_its_time_limit_requeues_and_resumes(cluster, job_dir):
    """The job cannot finish by itself (a step count of days, --max_max_epoch far beyond it) until the test
    has stopped it twice: its flag file (@FILE, read at every start) gives the real end only then, so
    however fast the machine, every signal reaches a job still training."""
    flags = job_dir / "requeue.flags"
    flags.write_text("--max_steps 100000000  # until the test sets the end\n")
    job = cluster.sbatch(*CPU_JOB, "--ntasks-per-node=2", os.path.join(ROOT, "slurm", "ptb_large.sh"),
                         "--data_path", job_dir / "data", *TINY, "--max_max_epoch", "1000000", f"@{flags}",
                         env=job_env(), cwd=job_dir)
    save_path = job_dir / "runs" / f"ptb_large-{job}"
    wait_for_progress(cluster, job_dir, job, start=1)
    # What --signal=USR1@300 does ahead of the time limit: SIGUSR1 to every task of the job's steps.
    cluster.command("scancel", "--signal=USR1", job)
    wait_until_requeued(cluster, job, restarts=1)
    release(cluster, job)
    wait_for_progress(cluster, job_dir, job, start=2)
    # Requeued by the scheduler (scontrol requeue, preemption): SIGTERM to the tasks; held until released.
    cluster.command("scontrol", "requeuehold", job)
    wait_until_requeued(cluster, job, restarts=2)
    stopped_at = checkpoint_step(save_path)
    steps = stopped_at + 40
    flags.write_text(f"--max_steps {steps}\n")
    release(cluster, job)
    info = cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 600)
    log = log_of(job_dir, "ptb_large", job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), log[-3000:]

    assert [int(n) for n in re.findall(r"\[slurm\] job \d+ \(ptb_large\) start (\d+)", log)] == [1, 2, 3]
    # srun's own report of the tasks' 138: one line for both, or one each when rank 0 outlives rank 1's exit
    # (its SIGTERM from --kill-on-bad-exit is ignored once the stop is saved: distrnn.run.stops).
    assert re.search(r"tasks? [0-9-]+: Exited with exit code 138", log), log[-3000:]
    assert "[slurm] stopped ahead of the time limit with a checkpoint; requeueing job" in log
    # Both stops were distrnn's own: a checkpoint, then the exit (srun's line for the SIGTERM one may be missing:
    # srun is signalled too, and under load it can end before it reports the tasks' exit codes).
    assert log.count("stopped by signal: checkpoint saved in") == 2, log[-3000:]
    assert log.count("[slurm] this allocation is not what the script's #SBATCH header asks for: --ntasks-per-node 2 "
                     "(header: 4), --cpus-per-task 1 (header: 8), --gpus-per-node 0 (header: 4);") == 3  # every start
    resumed = [int(s) for s in re.findall(r"resumed from \S+/ckpt-(\d+) at epoch", log)]
    assert len(resumed) == 2 and 0 < resumed[0] < resumed[1] == stopped_at, log[-3000:]
    assert log.count("--resume: no checkpoint") == 1  # only the first start began from scratch
    metrics = json.loads((save_path / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["steps"]) == (2, 20, steps)
    assert os.path.exists(save_path / "checkpoints" / f"ckpt-{steps}.index")
    # Stopped twice, it ends where one uninterrupted process ends.
    reference = reference_run(job_dir, steps, "--max_max_epoch", "1000000")
    assert metrics["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-5)
    for a, b in zip(metrics["history"], reference["history"], strict=True):
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_a_bad_flag_fails_the_job_with_one_line_in_its_log(cluster, job_dir):
    job = cluster.sbatch(*CPU_JOB, "--ntasks-per-node=1", os.path.join(ROOT, "slurm", "ptb_small.sh"),
                         "--data_path", job_dir / "data", "--hidden_sise", "16", env=job_env(), cwd=job_dir)
    info = cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED"], 120)
    log = log_of(job_dir, "ptb_small", job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [line for line in log.splitlines() if "error" in line and "srun" not in line]
    assert errors == ["distrnn.ptb: error: unrecognized arguments: --hidden_sise 16 (did you mean --hidden_size?); "
                      "see --help for the flags"], log
    assert "Traceback" not in log


@pytest.mark.slow
def test_horovodrun_inside_an_allocation_uses_the_slurm_host_list(cluster, job_dir):
    script = os.path.join(ROOT, "launch", "slurm_horovodrun.sh")
    out = job_dir / "horovodrun.json"
    job = cluster.sbatch(*CPU_JOB, "--ntasks-per-node=2", "--job-name=hvdrun", "--output=logs/%x-%j.out",
                         "--wrap", f"bash {script} -m distrnn.ptb --config test --data_path {job_dir / 'data'} "
                                   f"--max_steps 5 --save_path {job_dir / 'hvdrun'} --metrics_json {out}",
                         env=job_env(), cwd=job_dir)
    info = cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED"], 180)
    log = log_of(job_dir, "hvdrun", job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert f"[slurm_horovodrun] 2 processes on {cluster.nodes[0]}:2" in log
    assert json.loads(out.read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_nodes_train_together_through_srun(two_node_cluster, job_dir, reference):
    """Two slurmd, each a node in its own network namespace: 2 nodes x 1 task, through srun and the
    Gloo rendezvous rank 0 serves on n1 (no ssh, no horovodrun)."""
    job = two_node_cluster.sbatch(*CPU_JOB, "--nodes=2", "--ntasks-per-node=1",
                                  os.path.join(ROOT, "slurm", "ptb_large.sh"), "--data_path", job_dir / "data",
                                  *TINY, "--max_steps", STEPS, env=job_env(), cwd=job_dir / "two_nodes")
    info = two_node_cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 300)
    log = log_of(job_dir / "two_nodes", "ptb_large", job)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), log[-3000:]
    assert "2 task(s), n1:1,n2:1" in log
    metrics = json.loads((job_dir / "two_nodes" / "runs" / f"ptb_large-{job}" / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert [(r["rank"], r["host"]) for r in ranks] == [(0, "n1"), (1, "n2")]
    assert ranks[0]["test_perplexity"] == ranks[1]["test_perplexity"] == metrics["test_perplexity"]
    assert ranks[0]["weights_norm"] == ranks[1]["weights_norm"]  # the replicas agree to the bit
    assert metrics["steps"] == STEPS and len(metrics["words_per_sec_per_rank"]) == 2
    assert metrics["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_two_nodes_train_on_tensorflows_collectives_and_requeue(two_node_cluster, job_dir):
    """The same script on the newest TensorFlow (no Horovod there: srun's two tasks join through TensorFlow's
    collectives, the cluster read from Slurm's variables), stopped by the time limit's SIGUSR1 and requeued:
    it ends where one process ends. Without the second stack, stack 1 is told --engine tensorflow."""
    python = os.environ.get("DISTRNN_OTHER_PYTHON") or sys.executable
    engine = [] if python != sys.executable else ["--engine", "tensorflow"]
    directory, flags = job_dir / "two_nodes", job_dir / "two_nodes" / "requeue.flags"
    flags.write_text("--max_steps 100000000  # until the test sets the end\n")
    job = two_node_cluster.sbatch(*CPU_JOB, "--nodes=2", "--ntasks-per-node=1",
                                  os.path.join(ROOT, "slurm", "ptb_large.sh"), "--data_path", job_dir / "data",
                                  *TINY, *engine, "--max_max_epoch", "1000000", f"@{flags}",
                                  env=dict(job_env(), DISTRNN_PYTHON=python), cwd=directory)
    wait_for_progress(two_node_cluster, directory, job, start=1)
    two_node_cluster.command("scancel", "--signal=USR1", job)
    wait_until_requeued(two_node_cluster, job, restarts=1)
    save_path = directory / "runs" / f"ptb_large-{job}"
    steps = checkpoint_step(save_path) + 40
    flags.write_text(f"--max_steps {steps}\n")
    release(two_node_cluster, job)
    info = two_node_cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 600)
    log = log_of(directory, "ptb_large", job)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), log[-3000:]
    assert log.count("engine: tensorflow (RING collectives), 2 process(es)") == 2, log[-3000:]  # both starts
    assert log.count("stopped by signal: checkpoint saved in") == 1 and "Traceback" not in log, log[-3000:]
    metrics = json.loads((save_path / "metrics.json").read_text())
    assert (metrics["engine"], metrics["collectives"], metrics["steps"]) == ("tensorflow", "RING", steps)
    assert [(r["rank"], r["host"]) for r in metrics["ranks"]] == [(0, "n1"), (1, "n2")]
    assert metrics["ranks"][0]["weights_norm"] == metrics["ranks"][1]["weights_norm"]  # the replicas agree
    reference = reference_run(job_dir, steps, "--max_max_epoch", "1000000", python=python, name="reference-tf")
    assert metrics["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-5)
    for a, b in zip(metrics["history"], reference["history"], strict=True):
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-5)


@pytest.mark.parametrize("engine", ["horovod", "tensorflow"])
def test_the_shaped_link_carries_the_bytes_the_scaling_model_counts(two_node_cluster, engine):
    """PTB small's gradients all-reduced between the two nodes (bench/allreduce_step.py under srun) over
    their veth pair, shaped by tc to 1 Gbit/s: what each node sends for one all-reduce (runs of 3 and of 1
    timed all-reduce, their difference over 2) is what the scaling model counts, the dense gradients' ring
    all-reduce and every other rank's embedding rows, plus the headers of TCP and the engine's framing."""
    if engine == "horovod" and not horovod.loads():
        pytest.skip("Horovod is not installed on this stack (TensorFlow 2.19 and newer)")
    from distrnn.scaling import model
    two_node_cluster.shape(1000)
    try:
        sent = []
        for repeats in (1, 3):
            before = two_node_cluster.sent_bytes()
            two_node_cluster.command("srun", "-N2", "-n2", "--ntasks-per-node=1", sys.executable,
                                     os.path.join(ROOT, "bench", "allreduce_step.py"), "--config", "small",
                                     "--engine", engine, "--repeats", repeats, env=job_env(), cwd=ROOT, timeout=300)
            after = two_node_cluster.sent_bytes()
            sent.append({node: after[node] - before[node] for node in after})
    finally:
        two_node_cluster.shape(None)
    small = model.Model(hidden_size=200, num_layers=2, num_steps=20, vocab_size=10000)
    g = model.gradient_bytes(small, rows=20)
    counted = model.ring_allreduce_bytes(g["lstm"] + g["softmax"], 2) + model.ring_allgather_bytes(
        g["embedding_rows"], 2)
    assert counted == 2 * 401 * 800 * 4 + 201 * 10000 * 4 + 20 * 20 * (200 * 4 + 8) == 10_929_600
    for node in ("n1", "n2"):
        per_allreduce = (sent[1][node] - sent[0][node]) / 2
        assert counted < per_allreduce < counted * 1.03, (node, per_allreduce, counted)


@pytest.mark.slow
def test_sbatch_mnist_trains_the_stacked_preset_on_two_ranks(cluster, job_dir):
    """slurm/mnist.sh on CPUs: 2 tasks, each placing its 3 layers on 3 virtual devices (pipelined)."""
    images = write_images(job_dir / "images")
    job = cluster.sbatch(*CPU_JOB, "--ntasks-per-node=2", os.path.join(ROOT, "slurm", "mnist.sh"),
                         "--data_path", images, "--hidden_size", "8", "--batch_size", "10", "--validation_size", "100",
                         "--virtual_devices", "3", "--max_steps", "20", env=job_env(), cwd=job_dir)
    info = cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 180)
    log = log_of(job_dir, "mnist", job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    metrics = json.loads((job_dir / "runs" / f"mnist-{job}" / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["steps"]) == (2, 20, 20)
    assert metrics["config"]["num_layers"] == 3 and metrics["placement"]["schedule"] == "pipeline"
    assert metrics["placement"]["layers"] == ["/device:CPU:0", "/device:CPU:1", "/device:CPU:2"]
    ranks = metrics["ranks"]
    assert ranks[0]["weights_norm"] == ranks[1]["weights_norm"]  # the replicas agree to the bit
    assert sum(map(sum, metrics["confusion_matrix"])) == 200


@pytest.mark.slow
def test_a_node_lost_mid_run_goes_on_on_the_node_left_requeued_and_finished_there(two_node_cluster, job_dir):
    """sbatch --nodes=1-2: the job starts on both nodes (two tasks a node, which fill its two cores: Slurm 22.05
    gives a range more than its minimum only where the tasks need it, measured). n2 dies (every process of its
    namespace killed -9, slurmd included, and the node marked down): the allocation keeps n1 (--no-kill) and
    the step runs again there, two tasks, from the last checkpoint. Stopped for its time limit, the job
    requeues itself; Slurm then asks for its first task count (measured: pending, ReqNodeNotAvail) until told
    fewer (docs/elastic.md), and it finishes on n1: three starts, one global batch, the figures of one
    uninterrupted process."""
    cluster, directory = two_node_cluster, job_dir / "two_nodes"
    flags = directory / "node_range.flags"
    flags.write_text("--max_steps 100000000  # until the test sets the end\n")
    job = cluster.sbatch(*CPU_JOB, "--nodes=1-2", "--ntasks-per-node=2", os.path.join(ROOT, "slurm", "ptb_large.sh"),
                         "--data_path", job_dir / "data", *TINY, "--checkpoint_every", "20", "--max_max_epoch",
                         "1000000", f"@{flags}", env=job_env(), cwd=directory)
    save_path = directory / "runs" / f"ptb_large-{job}"
    try:
        wait_for_progress(cluster, directory, job, start=1)
        assert cluster.job(job)["NodeList"] == "n[1-2]"
        cluster.wait_for(lambda: (save_path / "checkpoints" / "checkpoint").exists()
                         and checkpoint_step(save_path) >= 20, 300, "a checkpoint")
        cluster.kill_node("n2")
        going_on = "node(s) lost; going on on n1 from the last checkpoint (restart 1 of 3)"
        cluster.wait_for(lambda: going_on in log_of(directory, "ptb_large", job) and re.search(
            r"step \d+/\d+ \(", log_of(directory, "ptb_large", job).split(going_on)[1]), 300, "progress on n1")
        assert cluster.job(job)["NodeList"] == "n1"
        cluster.command("scancel", "--signal=USR1", job)
        cluster.wait_for(lambda: cluster.job(job).get("Restarts") == "1" and cluster.state_of("n1") == "IDLE", 300,
                         f"job {job} requeued, n1 idle")
        steps = checkpoint_step(save_path) + 40
        flags.write_text(f"--max_steps {steps}\n")
        release(cluster, job)
        cluster.wait_for(lambda: "ReqNodeNotAvail" in cluster.job(job).get("Reason", ""), 60, "Slurm's reason")
        cluster.command("scontrol", "update", f"JobId={job}", "NumTasks=2")
        info = cluster.wait_for_state(job, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], 300)
    finally:
        cluster.revive_node("n2")
    log = log_of(directory, "ptb_large", job)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n1"), log[-3000:]
    assert f"[slurm] job {job} (ptb_large) start 2 on n1: 2 task(s), n1:2;" in log, log[-3000:]
    assert "Traceback" not in log
    metrics = json.loads((save_path / "metrics.json").read_text())
    # The third start is 2 processes again: no new size.
    assert [s["world_size"] for s in metrics["sizes"]] == [4, 2] and metrics["global_batch_size"] == 20
    reference = reference_run(job_dir, steps, "--checkpoint_every", "20", "--max_max_epoch", "1000000",
                              name="reference-node-lost")
    assert metrics["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-5)
    for a, b in zip(metrics["history"], reference["history"], strict=True):
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-5)
