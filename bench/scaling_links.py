"""The scaling model's communication, calibrated on real links: two Slurm nodes, each in its own network
namespace, joined by a veth pair whose bandwidth tc shapes with an htb class (tests/slurm_cluster.py, the
fixture the two-node tests use; root). One run; medians of --repeats.

    python bench/scaling_links.py [--mbits 100 1000 10000] [--configs small medium large]
                                  [--engines horovod tensorflow] [--repeats 3] [--data_path ../shared/data/ptb]

For each link: its TCP throughput (one stream, node 1 to node 2), then the all-reduce of each preset's
gradients (bench/allreduce_step.py: the LSTM's and the softmax's dense, the embedding's rows gathered) with
each engine, under srun, a task a node, against the model (distrnn.scaling.model: the ring all-reduce and
the rows' all-gather between 2 ranks) fed the link's measured throughput and each engine's latency, taken
from a one-float all-reduce on the unshaped link (this kernel has no netem or tbf: no delay can be added),
and each engine's own rate, from 100 MB all-reduced on the unshaped link (less that link's own time, for an
engine whose time adds to the link's).
Then PTB small trained by the 2 ranks on each link, its step against the model's: the compute of a rank
(measured: two unjoined processes side by side on this machine's cores, as the ranks share them) plus the
model's gradient exchange, less what the engine hides behind the backward pass (Horovod; the LSTM's share
of the step from the calibrated compute model, bench/scaling_compute.py).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import scaling_compute  # noqa: E402
import slurm_cluster  # noqa: E402
from distrnn.ptb.configs import PRESETS  # noqa: E402
from distrnn.scaling import hardware, model  # noqa: E402

VOCAB = 10000  # bench/allreduce_step.py's gradients are the full PTB's
BIG = 25_000_000  # floats: the all-reduce that measures an engine's own rate
PORT = 29871
PROBE = r"""
import json, socket, statistics, sys, threading, time
role, host, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def listen(port):
    server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port)); server.listen(1)
    return server
def connect(port):
    for _ in range(100):
        try:
            conn = socket.create_connection((host, port)); break
        except OSError:
            time.sleep(0.1)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn
def echo(server):
    conn, _ = server.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(1):
        conn.sendall(b"p")
def pings(conn, until):
    times = []
    while not until():
        began = time.perf_counter(); conn.sendall(b"p"); conn.recv(1); times.append(time.perf_counter() - began)
        time.sleep(0.01)
    return times
if role == "receive":
    bulk, pinged = listen(port), listen(port + 1)
    threading.Thread(target=echo, args=(pinged,), daemon=True).start()
    conn, _ = bulk.accept(); got = 0
    while got < size:
        got += len(conn.recv(1 << 20) or b"x" * size)
    conn.sendall(b"k")
else:
    conn, ping = connect(port), connect(port + 1)
    idle = pings(ping, lambda t=time.perf_counter() + 0.5: time.perf_counter() > t)
    chunk, sent, began, done = b"\0" * (1 << 20), 0, time.perf_counter(), []
    def send():
        global sent
        while sent < size:
            conn.sendall(chunk); sent += len(chunk)
        conn.recv(1); done.append(time.perf_counter())
    sender = threading.Thread(target=send); sender.start()
    time.sleep(0.5)  # the queue fills
    loaded = pings(ping, lambda: bool(done))
    sender.join()
    print(json.dumps({"bytes_per_s": sent / (done[0] - began), "idle_s": statistics.median(idle),
                      "loaded_s": statistics.median(loaded)}))
"""


def tcp_probe(cluster, mbit, tries: int = 3) -> dict:
    """One TCP stream from node 1 to node 2, about 2 s of data at the link's rate: its throughput, and a
    ping-pong's round trip beside it, before the stream and during it (a message then waits behind the
    full link's queue, as under an all-reduce)."""
    size = int((mbit or 20000) * 1e6 / 8 * 2)
    to = cluster.addresses["n2"]
    receiver = subprocess.Popen(cluster.in_node("n2", [sys.executable, "-c", PROBE, "receive", to, str(PORT),
                                                       str(size)]))
    try:
        sender = subprocess.run(cluster.in_node("n1", [sys.executable, "-c", PROBE, "send", to, str(PORT), str(size)]),
                                capture_output=True, text=True, timeout=120)
    finally:
        try:
            receiver.wait(timeout=30)
        except subprocess.TimeoutExpired:  # its sender failed before the stream ended
            receiver.kill()
            receiver.wait()
    if sender.returncode == 0:
        return json.loads(sender.stdout.strip().splitlines()[-1])
    print(f"  the TCP probe failed ({sender.stderr.strip().splitlines()[-1:]}); again", flush=True)
    assert tries > 1, sender.stderr
    return tcp_probe(cluster, mbit, tries - 1)


def env():
    return dict(machine.child_env(), TF_CPP_MIN_LOG_LEVEL="2")


def srun(cluster, *args, timeout=900) -> str:
    """A 2-task step, a task a node, of `python ARGS`; its output."""
    return cluster.command("srun", "-N2", "-n2", "--ntasks-per-node=1", sys.executable, *args, timeout=timeout,
                           env=env(), cwd=ROOT).stdout


def allreduce_ms(cluster, engine: str, what: list, repeats: int) -> float:
    """bench/allreduce_step.py's milliseconds an all-reduce: the JSON its rank 0 prints last."""
    out = srun(cluster, os.path.join(HERE, "allreduce_step.py"), "--engine", engine, "--repeats", repeats, *what)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["ms_per_allreduce"]


def predicted_exchange(config: str, engine: str, link: hardware.Link, engine_gbps: float,
                       lstm_seconds: float = 0.0) -> dict:
    """The model's gradient exchange of `config` between the two nodes (distrnn's default: rows gathered)."""
    c = PRESETS.get(config)
    shapes = model.Model(c.hidden_size, c.num_layers, c.num_steps, VOCAB)
    two = model.Cluster(None, link, link, gpus_per_node=1)
    return model.communication(shapes, 2, 1, two, c.batch_size, lstm_seconds,
                               a=model.engine_assumptions(engine, on_cpus=True, engine_gbps=engine_gbps),
                               sparse_as_dense=False)


def pieces(engine: str, nbytes: float) -> int:
    """The all-reduces the model counts for one tensor of `nbytes` (the engine's fusion or pieces, on CPUs)."""
    return model.allreduce_count(nbytes, model.engine_assumptions(engine, on_cpus=True).fusion_mb * 1e6)


def engine_rate(engine: str, seconds: float, latency_us: float, link_bytes_per_s: float) -> float:
    """GB/s at which `engine` itself moves an all-reduce's bytes, from `seconds` for BIG floats between the two
    nodes on the unshaped link (latency a ring step, TCP rate): less the ring's latencies (2 a piece, as the
    model counts them), and, where the engine does not stream, less the link's own time, which its bytes spend
    one after the other with the engine's (the model adds the two back on each shaped link)."""
    nbytes = BIG * 4
    sent = model.ring_allreduce_bytes(nbytes, 2)  # what the model divides by the engine's rate, as by a link's
    seconds -= 2 * pieces(engine, nbytes) * latency_us * 1e-6
    if not model.engine_assumptions(engine, on_cpus=True).engine_streams:
        seconds -= sent / link_bytes_per_s
    return sent / 1e9 / seconds


def side_by_side_step(data_path: str, steps: int) -> float:
    """Seconds a PTB small step takes in each of two unjoined processes running together (as two ranks on
    this machine share its cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, "-m", "distrnn.ptb", "--config", "small", "--data_path", data_path,
                                   "--max_steps", str(steps), "--save_path", os.path.join(tmp, f"run{i}"),
                                   "--metrics_json", os.path.join(tmp, f"m{i}.json")], cwd=ROOT, env=env(),
                                  stdout=subprocess.DEVNULL) for i in range(2)]
        assert all(p.wait() == 0 for p in procs)
        rates = [json.load(open(os.path.join(tmp, f"m{i}.json")))["words_per_sec"] for i in range(2)]
    c = PRESETS.get("small")
    return c.batch_size * c.num_steps / statistics.mean(rates)


def two_rank_step(cluster, engine: str, data_path: str, steps: int) -> float:
    """Seconds of a PTB small step trained by two ranks, a node each, 20 rows a rank."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        metrics = os.path.join(tmp, "m.json")
        srun(cluster, "-m", "distrnn.ptb", "--config", "small", "--global_batch_size", "40", "--engine", engine,
             "--data_path", data_path, "--max_steps", steps, "--save_path", os.path.join(tmp, "run"),
             "--metrics_json", metrics, timeout=1800)
        with open(metrics) as f:
            m = json.load(f)
    c = PRESETS.get("small")
    return 2 * c.batch_size * c.num_steps / m["words_per_sec"]


def predicted_two_rank_step(compute_s: float, lstm_share: float, engine: str, link: hardware.Link,
                            engine_gbps: float) -> float:
    return compute_s + predicted_exchange("small", engine, link, engine_gbps, compute_s * lstm_share)["exposed_s"]


def failure(error: AssertionError) -> str:
    """The first line of a failed step's output that says why."""
    for line in str(error).splitlines():
        if re.search(r"Deadline Exceeded|DEADLINE_EXCEEDED|Error:|error:", line):
            return line.split("] ", 1)[-1].strip()[:200]  # past a TensorFlow log line's prefix
    return str(error).splitlines()[0][:200]


def measure(label: str, predicted: float, measured) -> dict:
    """A row of predicted against measured (a function: the measurement), or the reason it failed."""
    try:
        return row(label, predicted, measured())
    except AssertionError as e:
        print(f"  {label:<40} predicted {predicted * 1000:10.2f} ms  FAILED: {failure(e)}", flush=True)
        return {"what": label, "predicted_ms": round(predicted * 1000, 3), "failed": failure(e)}


def row(label: str, predicted: float, measured: float) -> dict:
    print(f"  {label:<40} predicted {predicted * 1000:10.2f} ms  measured {measured * 1000:10.2f} ms  ratio "
          f"{predicted / measured:.3f}", flush=True)
    return {"what": label, "predicted_ms": round(predicted * 1000, 3), "measured_ms": round(measured * 1000, 3),
            "ratio": round(predicted / measured, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mbits", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument("--configs", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--engines", nargs="+", default=["horovod", "tensorflow"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="PTB small's training steps a run (5 not timed)")
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "ptb"))
    args = p.parse_args()
    reason = slurm_cluster.missing() or slurm_cluster.netns_missing()
    if reason:
        sys.exit(f"scaling_links: {reason}")
    out = {"machine": machine.start(), "links": {}}
    rates = scaling_compute.cpu_rates(["small"], VOCAB)
    parts = scaling_compute.predicted_parts("small", VOCAB, rates)
    lstm_share = parts["lstm"] / parts["total"]
    compute = statistics.median(side_by_side_step(args.data_path, args.steps) for _ in range(args.repeats))
    print(f"PTB small, a rank's compute (two processes side by side): {compute * 1000:.1f} ms a step; the LSTM's "
          f"share of it (the compute model's): {lstm_share:.2f}", flush=True)
    with slurm_cluster.SlurmCluster(["n1", "n2"], netns=True) as cluster:
        latency = {e: statistics.median(allreduce_ms(cluster, e, ["--floats", "1"], 20) for _ in range(args.repeats))
                   / 2 * 1000 for e in args.engines}  # a 2-rank ring's all-reduce: 2 steps, a latency each
        unshaped = statistics.median(tcp_probe(cluster, None)["bytes_per_s"] for _ in range(args.repeats))
        engine_gbps = {e: engine_rate(e, statistics.median(allreduce_ms(cluster, e, ["--floats", BIG], 5)
                                                           for _ in range(args.repeats)) / 1000,
                                      latency[e], unshaped) for e in args.engines}
        print("latency a ring step, one float on the unshaped link: " +
              ", ".join(f"{e} {us:.0f} us" for e, us in latency.items()) + "; that link carries TCP at "
              f"{unshaped * 8 / 1e9:.1f} Gbit/s; the engines' own rate, 100 MB on it: "
              + ", ".join(f"{e} {gbps * 8:.1f} Gbit/s" for e, gbps in engine_gbps.items()), flush=True)
        for mbit in args.mbits:
            cluster.shape(mbit)
            probes = [tcp_probe(cluster, mbit) for _ in range(args.repeats)]
            tcp = statistics.median(p["bytes_per_s"] for p in probes)
            queue_us = statistics.median(p["loaded_s"] - p["idle_s"] for p in probes) * 1e6
            print(f"link shaped to {mbit} Mbit/s: TCP carries {tcp * 8 / 1e6:.0f} Mbit/s; a message waits "
                  f"{queue_us / 1000:.1f} ms behind its full queue", flush=True)
            rows = []
            for engine in args.engines:
                link = hardware.Link(f"{mbit} Mbit/s", tcp / 1e9, latency[engine], "measured here")
                for config in args.configs:
                    predicted = predicted_exchange(config, engine, link, engine_gbps[engine])["total_s"]
                    rows.append(measure(f"{engine} all-reduce, PTB {config}", predicted,
                                        lambda: statistics.median(
                                            allreduce_ms(cluster, engine, ["--config", config], args.repeats)
                                            for _ in range(args.repeats)) / 1000))
                rows.append(measure(f"{engine} PTB small step, 2 ranks",
                                    predicted_two_rank_step(compute, lstm_share, engine, link, engine_gbps[engine]),
                                    lambda: statistics.median(two_rank_step(cluster, engine, args.data_path, args.steps)
                                                              for _ in range(args.repeats))))
            out["links"][mbit] = {"tcp_mbit": round(tcp * 8 / 1e6, 1), "queue_ms": round(queue_us / 1000, 2),
                                  "rows": rows}
        cluster.remove()
    out.update(latency_us=latency, unshaped_tcp_mbit=round(unshaped * 8 / 1e6),
               engine_gbit={e: round(g * 8, 2) for e, g in engine_gbps.items()},
               small_compute_ms=round(compute * 1000, 2), lstm_share=round(lstm_share, 3))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
