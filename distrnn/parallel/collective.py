"""TensorFlow's own collective runtime as distrnn's engine (`--engine tensorflow`): the one that runs on
every TensorFlow distrnn supports, 2.19 and newer included, where Horovod does not build.

A process joins from `TF_CONFIG` (tf.distribute's convention, which Kubeflow's TFJob sets: a cluster of
`chief` and `worker` tasks and this process's task), which distrnn writes itself for an srun step of
several tasks (`srun_tf_config`) and python -m distrnn.launch for N processes on one machine
(`local_workers`). The runtime is
TensorFlow's: creating a `tf.distribute.MultiWorkerMirroredStrategy` starts the gRPC server, the
collective executor and the coordination service, whose heartbeats tell a dead or frozen peer in about
ten seconds (measured: a killed worker fails the others' collective with UnavailableError after 10.4 s,
on 2.15 and 2.21). The collectives themselves go through the strategy's replica launcher
(`cross_device_utils.CollectiveReplicaLauncher`: RING on CPUs, NCCL on GPUs, instance keys fed at call
time so that workers tracing at different moments still agree, an ordering token per launcher) rather
than `strategy.run`: distrnn's loop owns its variables and tf.functions, which tf.distribute's public
API would have it hand over (MirroredVariables, replica contexts). That launcher is TensorFlow-internal;
its methods are the same in 2.15 and 2.21, and the tests run both.
"""
import dataclasses
import json
import os
import pickle
import re
import socket
import struct
import time
from typing import Any, ClassVar, List, Optional

import numpy as np

from distrnn.config import env_number
from distrnn.errors import RankLost, UsageError
from distrnn.parallel import local_devices, slurm_env, srun
from distrnn.parallel.world import World

ROLES = ("chief", "worker")  # in rank order: a TFJob's chief is rank 0


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in a TF_CONFIG cluster, ranked chief first, then workers."""
    rank: int
    addresses: tuple   # every task's host:port, in rank order
    role: str
    index: int

    @property
    def size(self) -> int:
        return len(self.addresses)

    @property
    def host(self) -> str:
        return self.addresses[self.rank].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.addresses[self.rank].rsplit(":", 1)[1])

    @property
    def local_rank(self) -> int:
        return [a.rsplit(":", 1)[0] for a in self.addresses[:self.rank]].count(self.host)

    @property
    def local_size(self) -> int:
        return [a.rsplit(":", 1)[0] for a in self.addresses].count(self.host)


def free_ports(count: int, first: int = 0) -> List[int]:
    """`count` ports of localhost: first, first + 1, ... when given (each checked free), else the system's."""
    ports, sockets = [], []
    try:
        for i in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(probe)
            try:
                probe.bind(("127.0.0.1", first + i if first else 0))
            except OSError as error:
                raise UsageError(f"port {first + i} of localhost is taken ({error.strerror}): give --port a range of "
                                 f"{count} free ports, or leave --port out") from None
            ports.append(probe.getsockname()[1])
    finally:
        for probe in sockets:
            probe.close()
    return ports


def tf_configs(ports: List[int]) -> List[str]:
    """Each worker's TF_CONFIG: the same cluster of localhost workers, its own index."""
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(len(ports))]


def local_workers(size: int, first_port: int = 0):
    """For python -m distrnn.launch: each of `size` workers' environment on this machine (its TF_CONFIG, the
    workers on ports first_port, first_port + 1, ... or free ones), and what ends the start (nothing: the
    workers serve their own runtime)."""
    return [{"TF_CONFIG": config} for config in tf_configs(free_ports(size, first_port))], lambda: None


def read_tf_config(text: str) -> Task:
    """TF_CONFIG's cluster and task, checked: one line naming what is wrong otherwise (UsageError)."""
    fix = ('TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": '
           '"worker", "index": 0}}')
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise UsageError(f"TF_CONFIG is not JSON ({error}); {fix}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict) or not isinstance(spec.get("task"), dict):
        raise UsageError(f"TF_CONFIG has no cluster or no task; {fix}")
    cluster, task = spec["cluster"], spec["task"]
    other = sorted(set(cluster) - set(ROLES) - {"evaluator"})
    if other:
        raise UsageError(f"TF_CONFIG's cluster has {', '.join(other)} tasks: distrnn trains with chief and worker "
                         f"tasks only (all-reduce, no parameter servers)")
    addresses = []
    for role in ROLES:
        listed = cluster.get(role, [])
        if not isinstance(listed, list) or not all(isinstance(a, str) and _address_ok(a) for a in listed):
            raise UsageError(f"TF_CONFIG's cluster.{role} must be a list of \"host:port\" strings; {fix}")
        addresses += listed
    if len(set(addresses)) != len(addresses):
        raise UsageError("TF_CONFIG's cluster names one host:port twice: give every task its own port")
    role, index = task.get("type"), task.get("index")
    if role not in ROLES:
        raise UsageError(f"TF_CONFIG's task type is {role!r}: distrnn runs as a chief or worker task")
    count = len(cluster.get(role, []))
    if type(index) is not int or not 0 <= index < count:
        raise UsageError(f"TF_CONFIG's task index {index!r} is not one of the cluster's {count} {role} task(s) "
                         f"(0 to {count - 1})")
    rank = index + (len(cluster.get("chief", [])) if role == "worker" else 0)
    return Task(rank, tuple(addresses), role, index)


def _address_ok(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536


def srun_tf_config(task: slurm_env.SrunTask, env=os.environ) -> str:
    """TF_CONFIG for a task of an srun step: every task a worker on its node, at the step's port (see
    srun.rendezvous_port: from the job and step ids, or the ports srun reserved) plus its local rank, so
    that two steps sharing a node never take the same port."""
    base = srun.rendezvous_port(env)
    if base + max(count for _, count in task.slots) > 65536:
        raise UsageError(f"the step's port {base} leaves too few ports above it for its tasks: set "
                         f"DISTRNN_RENDEZVOUS_PORT lower")
    workers = [f"{node}:{base + i}" for node, count in task.slots for i in range(count)]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": task.rank}})


# A collective that waits longer than DISTRNN_COLLECTIVE_TIMEOUT (45 s, so that the line comes within a minute
# of the hang) for a peer ends the run with exit 75: a worker that hangs alive (a stuck read, a deadlock) still
# answers the coordination service's heartbeats, so only this timeout tells. Rank 0's one-off work (a checkpoint,
# a restore, a download) is waited for at a barrier of its own, for up to an hour: a slow disk is not a hung worker.
CHIEF_WORK_SECONDS = 3600.0
# TensorFlow's RING (its collectives between CPUs, over gRPC) sends a tensor as at most two chunks a rank
# (ring_alg.cc), so PTB large's 204 MB of dense gradients in one all-reduce travelled between 2 ranks as 51 MB
# messages: at 100 Mbit/s the coordination service's heartbeat replies waited behind them past their 10 s deadline
# and both ranks died (DEADLINE_EXCEEDED), and on an unshaped link such messages ran at half the rate of smaller
# ones. There, gradients go as one vector in pieces of at most PIECE_BYTES instead (measured, 2 ranks, 100 MB:
# one piece 297-310 ms, 64 MB 207-226, 32 MB 181-195, 16 MB 142-183, 8 MB 162-188, 4 MB 186-224; PTB large at
# 100 Mbit/s goes through in 20.7 s). NCCL (GPUs) streams a tensor in its own small chunks over its own
# connections: there one all-reduce pays the ring's latencies once.
PIECE_BYTES = 16 * 2**20
GREETING = b"distrnn meet v1 "  # what a task says before its rank, so other callers are ignored


def meet(task: Task, seconds: float) -> None:
    """Waits until every task of the cluster is up, before TensorFlow's runtime starts: that runtime waits for
    the cluster without end and holds the interpreter while it does (measured: the first worker of a
    2-worker cluster whose other worker never started still waited after 13 minutes, deaf to SIGTERM), so
    the tasks first meet here, on the ports TF_CONFIG gives them: each listens on its own and connects to
    every other's, saying its rank, until it has reached all and heard from all (then each of the others has
    reached it too: none stops listening before all have arrived). A port another process holds is bad input
    (UsageError); a task that does not come within `seconds`, a lost rank (RankLost, exit 75). A task that has
    met all starts TensorFlow's gRPC at once, which also dials the tasks still meeting: a greeting is read as
    a rank only after distrnn's own prefix (a CI run once read gRPC's "PRI " as rank 1,347,569,952 and waited)."""
    others = {i: address for i, address in enumerate(task.addresses) if i != task.rank}
    deadline = time.monotonic() + seconds
    reached, heard = set(), set()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("", task.port))
        except OSError as error:
            raise UsageError(f"port {task.port} of this host ({task.role} {task.index} in TF_CONFIG) is taken "
                             f"({error.strerror}): give the task a free port, or stop what holds it") from None
        listener.listen(max(8, len(others)))
        listener.settimeout(0.1)
        while not (others.keys() <= reached and others.keys() <= heard):
            if time.monotonic() > deadline:
                missing = [others[i] for i in sorted(others.keys() - (reached & heard))]
                raise RankLost(f"{task.role} {task.index} of TF_CONFIG did not meet {len(missing)} of the other "
                               f"{len(others)} task(s) ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}) "
                               f"within {seconds:g} s: start every task of the cluster, check that their hosts and "
                               f"ports are reachable, or raise DISTRNN_JOIN_TIMEOUT")
            reached |= {i for i in others.keys() - reached if _say_rank(others[i], task.rank)}
            heard |= _listen(listener)


def _say_rank(address: str, rank: int) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5) as connection:
            connection.sendall(GREETING + struct.pack("!I", rank))
        return True
    except OSError:
        return False


def _listen(listener: socket.socket) -> set:
    """The ranks of the tasks that connected since the last call."""
    heard = set()
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:  # the timeout: none waiting
            return heard
        with connection:
            connection.settimeout(2.0)
            try:
                data = connection.recv(len(GREETING) + 4, socket.MSG_WAITALL)
            except OSError:
                continue
            if len(data) == len(GREETING) + 4 and data.startswith(GREETING):
                heard.add(struct.unpack("!I", data[len(GREETING):])[0])


@dataclasses.dataclass(frozen=True)
class CollectiveWorld(World):
    """The World over TensorFlow's collective runtime (started by join)."""
    launcher: Any = dataclasses.field(default=None, repr=False, compare=False)  # CollectiveReplicaLauncher
    implementation: str = "RING"   # RING between CPUs, NCCL between GPUs
    gather: Any = dataclasses.field(default=None, repr=False, compare=False)    # tf.function: all-gather, axis 0
    engine: ClassVar[str] = "tensorflow"
    pins_gpus: ClassVar[bool] = True

    def describe(self) -> str:
        return f"{self.engine} ({self.implementation} collectives), {self.size} process(es)"

    def report(self) -> dict:
        return {"engine": self.engine, "collectives": self.implementation}

    def allreduce_sum(self, values) -> np.ndarray:
        import tensorflow as tf
        return self.launcher.all_reduce(tf.constant(np.asarray(values, dtype=np.float64))).numpy()

    def barrier(self) -> None:
        _patient_barrier(self.launcher)

    def allgather(self, array) -> np.ndarray:
        import tensorflow as tf
        return self.gather(tf.constant(np.asarray(array))).numpy()

    def allgather_object(self, obj) -> list:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8).astype(np.int32)
        lengths = self.allgather(np.array([len(data)], dtype=np.int64))
        padded = np.zeros(int(lengths.max()), dtype=np.int32)
        padded[:len(data)] = data
        rows = self.allgather(padded[None]).astype(np.uint8)
        return [pickle.loads(row[:length].tobytes()) for row, length in zip(rows, lengths)]

    def broadcast_object(self, obj):
        return self.allgather_object(obj if self.is_chief else None)[0]

    def broadcast_variables(self, variables) -> None:
        """Every rank's variables take rank 0's: a sum to which the other ranks add zeros (exact)."""
        import tensorflow as tf
        variables = list(variables)
        if variables:
            values = [v if self.is_chief else tf.zeros_like(v) for v in variables]
            for variable, value in zip(variables, self._all_reduce_pieces(values)):
                variable.assign(value)

    def average(self, tensor):
        return self.launcher.all_reduce(tensor) / self.size

    def average_gradients(self, grads, sparse_as_dense: bool = False, fp16: bool = False) -> list:
        """Dense gradients packed into one all-reduce (fp16: sent as float16), an embedding's IndexedSlices
        by all-gathering its rows and their indices (or as a dense tensor with sparse_as_dense), as the
        Horovod engine does."""
        import tensorflow as tf
        grads = [tf.convert_to_tensor(g) if sparse_as_dense and isinstance(g, tf.IndexedSlices) else g
                 for g in grads]
        dense = [i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)]
        if dense:
            sent = [tf.cast(grads[i], tf.float16) if fp16 else grads[i] for i in dense]
            for i, total in zip(dense, self._all_reduce_pieces(sent)):
                grads[i] = tf.cast(total, grads[i].dtype) / self.size
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):
                rows, indices = self._gather_slices(tf.cast(g.values, tf.float16) if fp16 else g.values, g.indices)
                grads[i] = tf.IndexedSlices(tf.cast(rows, g.values.dtype) / self.size, indices, g.dense_shape)
        return grads

    def _all_reduce_pieces(self, tensors) -> list:
        """The sums of `tensors`: those of a type sent as one vector, in pieces of at most PIECE_BYTES on RING."""
        sums = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # in the same order on every rank
            chosen = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            for i, total in zip(chosen, self._all_reduce_one_type([tensors[i] for i in chosen])):
                sums[i] = total
        return sums

    def _all_reduce_one_type(self, tensors) -> list:
        import tensorflow as tf
        sizes = [t.shape.num_elements() for t in tensors]
        if self.implementation != "RING" or None in sizes or not sum(sizes):  # one pack, as TensorFlow sends it
            return self.launcher.batch_all_reduce([tensors])
        flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        piece, total = max(1, PIECE_BYTES // flat.dtype.size), sum(sizes)
        pieces = tf.split(flat, [min(piece, total - start) for start in range(0, total, piece)])
        summed = tf.concat(self.launcher.batch_all_reduce([[p] for p in pieces]), axis=0)
        return [tf.reshape(s, t.shape) for s, t in zip(tf.split(summed, sizes), tensors)]

    def _gather_slices(self, rows, indices):
        """Every rank's rows and their indices, in one all-gather: each index's 8 bytes travel as columns of
        the rows' type beside its row (a gather copies bits, computes nothing). The launcher's public
        all_gather would run four collectives (a shape exchange before each of two gathers, for ranks whose
        row counts differ); every rank's count is the same here (batch x steps rows of an embedding, the same
        flags on every rank: check_same_run), so one gather of a fixed shape does, where that shape is known."""
        import tensorflow as tf
        if rows.shape[0] is None or rows.shape.rank is None:
            return self.launcher.all_gather(rows, axis=0), self.launcher.all_gather(indices, axis=0)
        count, row_shape = rows.shape[0], rows.shape[1:]
        width, words = row_shape.num_elements(), 8 // rows.dtype.size  # an int64 in words of the rows' type
        packed = tf.concat([tf.reshape(rows, [count, width]),
                            tf.reshape(tf.bitcast(tf.cast(indices, tf.int64), rows.dtype), [count, words])], axis=1)
        gathered = self.launcher._all_gather(packed, None)  # noqa: SLF001 (see above)
        index_words = tf.reshape(gathered[:, width:], [-1, words] if words > 1 else [-1])  # bitcast's shapes
        return (tf.reshape(gathered[:, :width], [-1, *row_shape]),
                tf.cast(tf.bitcast(index_words, tf.int64), indices.dtype))

    def lost(self, error: BaseException) -> Optional[str]:
        import tensorflow as tf
        if not isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                                  tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError)):
            return None
        text = getattr(error, "message", str(error))
        for mark in ("heartbeat timeout", "is down", "Collective ops is aborted", "timed out", "Deadline Exceeded",
                     "failed to connect", "Socket closed", "Connection reset"):
            if mark in text:
                return _reason(text, mark)
        return None


def _reason(text: str, mark: str) -> str:
    """The sentence of a runtime error that says what happened, without TensorFlow's node names."""
    # The line that holds the mark ("Graph execution error:" heads the error of a stopped peer's collective).
    line = next((line for line in text.splitlines() if mark in line), text.splitlines()[0] if text else "")
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", line)
    start = text.find("Task /job:")
    sentence = text[start:] if start >= 0 and mark == "heartbeat timeout" else text
    return sentence.split(". ")[0].rstrip(".") or mark


def _patient_barrier(launcher) -> None:
    """Every worker here, waiting up to CHIEF_WORK_SECONDS (not the collectives' timeout)."""
    import tensorflow as tf
    from tensorflow.python.distribute import collective_util
    launcher.all_reduce(tf.constant(0.0), options=collective_util.Options(timeout_seconds=CHIEF_WORK_SECONDS))


def _start_runtime(size: int, on_gpus: bool, timeout: float) -> dict:
    """TensorFlow's collective runtime for this process (from TF_CONFIG): the launcher of collectives among
    the workers' first devices (each collective aborted after `timeout` seconds), its implementation, and
    an all-gather function (the launcher gathers inside functions only)."""
    import tensorflow as tf
    from tensorflow.python.distribute import collective_util, cross_device_utils
    kinds = tf.distribute.experimental.CommunicationImplementation
    implementation = kinds.NCCL if on_gpus else kinds.RING
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    extended = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options).extended
    device = extended.worker_devices[0]
    keys = extended._collective_keys  # the strategy's: the group of the workers' first devices is its own
    launcher = cross_device_utils.CollectiveReplicaLauncher(
        keys.get_group_key([device]), size, keys, device,
        collective_util.Options(implementation=implementation, timeout_seconds=timeout))
    _patient_barrier(launcher)  # the job meets: every worker's runtime is up
    return {"launcher": launcher, "implementation": implementation.value,
            # reduce_retracing: objects of every size are gathered through it (pickled, padded)
            "gather": tf.function(lambda x: launcher.all_gather(x, axis=0), reduce_retracing=True)}


def join(gpus_per_rank: int = 0, virtual_devices: int = 0) -> Optional[CollectiveWorld]:
    """This process's place in a job of TensorFlow's engine: from TF_CONFIG, or from Slurm's variables in
    an srun step of several tasks. None when neither applies. Pins the process to its GPUs and shares the
    host's cores as the other engine does, splits the CPU into `virtual_devices` (the runtime fixes the
    devices when it starts), then starts the collective runtime."""
    text = os.environ.get("TF_CONFIG")
    if text is None:
        task = slurm_env.srun_task()
        if task is None:
            return None
        text = os.environ["TF_CONFIG"] = srun_tf_config(task)
    task = read_tf_config(text)
    meet(task, env_number(os.environ, "DISTRNN_JOIN_TIMEOUT", 120.0, float, positive=True, maximum=86400))
    timeout = env_number(os.environ, "DISTRNN_COLLECTIVE_TIMEOUT", 45.0, float, positive=True, maximum=86400)
    shape = CollectiveWorld(task.rank, task.size, task.local_rank, task.local_size, gpus_per_rank)
    local_devices.pin_gpus(shape)
    local_devices.share_cores(shape.local_size, by_srun="SLURM_STEP_ID" in os.environ)
    if virtual_devices:
        local_devices.setup_virtual_devices(virtual_devices)
    return dataclasses.replace(shape, **_start_runtime(task.size, local_devices.owns_gpus(), timeout))
