"""srun's tasks as one job without a launcher: where they meet (rank 0's node and a port, the network
interface that leads there), and the other tasks waiting until rank 0 serves the rendezvous. The engine
(distrnn.parallel.horovod) turns this into its own variables and serves its own rendezvous."""
import os
import re
import socket
import time

from distrnn.config import env_number
from distrnn.errors import RankLost, UsageError
from distrnn.parallel import slurm_env

# srun tasks meet at a Gloo rendezvous that rank 0 serves, on DISTRNN_RENDEZVOUS_PORT, else the first of
# the step's reserved ports (srun --resv-ports), else a port derived from the job and step ids in
# 20000-29999 (below Linux's ephemeral ports, so no outgoing connection holds it).
RENDEZVOUS_PORTS = range(20000, 30000)


def rendezvous_address(task: slurm_env.SrunTask, env=os.environ) -> str:
    """Rank 0's node's IPv4 address: DISTRNN_RENDEZVOUS_ADDR, or loopback when the step has one
    node, or the step's first node's name resolved (srun starts rank 0 there)."""
    if env.get("DISTRNN_RENDEZVOUS_ADDR"):
        return env["DISTRNN_RENDEZVOUS_ADDR"]
    first = task.slots[0][0]
    if task.rank == 0 and task.node != first:
        raise UsageError(f"rank 0 runs on {task.node}, not on the step's first node {first}, where the other "
                         f"tasks look for Horovod's rendezvous: use srun's default distribution (block), or set "
                         f"DISTRNN_RENDEZVOUS_ADDR to {task.node}'s address")
    if len(task.slots) == 1:
        return "127.0.0.1"
    try:
        return socket.getaddrinfo(first, None, socket.AF_INET)[0][4][0]
    except OSError:
        raise UsageError(f"cannot resolve the node name {first} (the step's first node, where rank 0 serves "
                         f"Horovod's rendezvous): set DISTRNN_RENDEZVOUS_ADDR to its IP address") from None


def rendezvous_port(env=os.environ) -> int:
    port = env_number(env, "DISTRNN_RENDEZVOUS_PORT", None, minimum=1, maximum=65535)
    if port:
        return port
    if env.get("SLURM_STEP_RESV_PORTS"):  # 12000-12001 or 12000,12005
        return env_number({"SLURM_STEP_RESV_PORTS": re.split(r"[-,]", env["SLURM_STEP_RESV_PORTS"])[0]},
                          "SLURM_STEP_RESV_PORTS", None, minimum=1, maximum=65535)
    job, step = env_number(env, "SLURM_JOB_ID", 0, minimum=0), env_number(env, "SLURM_STEP_ID", 0, minimum=0)
    # 101 is prime to the range's 10,000 ports: the first steps of two jobs share a port only when
    # their ids differ by a multiple of 10,000.
    return RENDEZVOUS_PORTS[(job * 101 + step) % len(RENDEZVOUS_PORTS)]


def interface_towards(address: str) -> str:
    """The name of this host's network interface whose address the kernel uses to reach `address`
    (lo for loopback): Gloo binds its connections to it."""
    import psutil
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))  # UDP: picks the route, sends nothing
        except OSError as error:
            raise UsageError(f"no route from this host to {address}, where Horovod's rendezvous is "
                             f"({error.strerror}); set DISTRNN_RENDEZVOUS_ADDR to an address the nodes share") from None
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    raise UsageError(f"no network interface holds {local}, this host's address towards {address}")


def check_own_name_resolves() -> None:
    """Horovod's Gloo looks this host's own name up when it sets up process sets, and crashes
    (a segmentation fault, measured) when the name does not resolve; a clear error instead."""
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        raise UsageError(f"this host's name {name!r} does not resolve (Horovod's Gloo looks it up): add it to "
                         f"/etc/hosts or DNS") from None


def wait_for_rendezvous(address: str, port: int, timeout: float, rank: int) -> None:
    """Waits until rank 0's rendezvous accepts connections: Horovod gives up after a few quick tries
    (measured: it aborts the process when the server is not up yet), and tasks start in any order."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=2).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise RankLost(f"rank {rank}: Horovod's rendezvous at {address}:{port} did not answer within "
                               f"{timeout:.0f} s ({error.strerror or error}): rank 0 did not start or failed (see "
                               f"its output), or a firewall blocks the port (set DISTRNN_RENDEZVOUS_PORT)") from None
            time.sleep(0.2)
