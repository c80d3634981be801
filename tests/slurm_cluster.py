"""A real Slurm cluster for the tests: munged, slurmctld and one slurmd per node, as root, with
every file (config, state, spool, logs, munge key and socket) in a temporary directory.

    with SlurmCluster(["node1"]) as cluster:             # one node on 127.0.0.1
        job = cluster.sbatch(["slurm/ptb_small.sh", ...])
    with SlurmCluster(["n1", "n2"], netns=True) as cluster:
        ...                                              # two nodes, two network namespaces

With netns=True each node runs inside its own network namespace, joined to the other by a veth
pair (10.77.0.1 and 10.77.0.2; no address is added outside the namespaces). slurmctld runs in the
first node's namespace, so client commands run there too (`cluster.command`). Each node's daemons
also get their own host name (a UTS namespace) and a private mount namespace with a hosts file
naming the nodes bind-mounted over /etc/hosts, so node names resolve for them and their jobs as
cluster DNS would (`ip netns exec` is not used: it remounts /sys, which hides the cgroup hierarchy
slurmd needs). Everything is stopped and removed
on exit, also when a test fails.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
CONFIG = """\
ClusterName=distrnn
SlurmctldHost={controller}({controller_addr})
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/socket
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=60
SchedulerParameters=sched_interval=1
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str:
    """Why a cluster cannot start here, or '' when it can."""
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root (SlurmUser=root); not root here"
    absent = [d for d in DAEMONS if not shutil.which(d)]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurmctld slurmd "
                f"slurm-client munge (launch/test.sh does it where it can)")
    return ""


def netns_missing() -> str:
    """Why two namespaced nodes cannot start here, or ''."""
    if not shutil.which("ip"):
        return "ip (iproute2) is not installed"
    probe = f"distrnn-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, nodes, netns=False, cpus=2):
        self.nodes, self.netns, self.cpus = list(nodes), netns, cpus
        self.dir = self.conf = None
        self.namespaces = {}
        self.links = {}  # node: its end of the veth pair
        self.processes = []

    # --- start and stop ------------------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        # Short, world-traversable paths: munged refuses a socket whose parent directories are not
        # executable by all, and a unix socket path has at most 107 characters.
        self.dir = tempfile.mkdtemp(prefix="distrnn-slurm-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        for sub in ("munge", "state", "log", *(f"spool/{node}" for node in self.nodes)):
            os.makedirs(os.path.join(self.dir, sub))
        os.chmod(os.path.join(self.dir, "munge"), 0o711)
        key = os.path.join(self.dir, "munge", "key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        if self.netns:
            addresses = self._make_namespaces()
        else:
            addresses = {node: "127.0.0.1" for node in self.nodes}
        self.addresses = addresses
        self.conf = os.path.join(self.dir, "slurm.conf")
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
                          for n, a in addresses.items())
        with open(self.conf, "w") as f:
            # slurmctld runs only where its host name is the SlurmctldHost.
            controller = self.nodes[0] if self.netns else socket.gethostname().split(".")[0]
            f.write(CONFIG.format(controller=controller, controller_addr=addresses[self.nodes[0]],
                                  dir=self.dir, ctld_port=free_port(), slurmd_port=free_port(), nodes=nodes))
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        m = os.path.join(self.dir, "munge")
        self._daemon(["munged", f"--socket={m}/socket", f"--key-file={key}", f"--log-file={m}/log",
                      f"--pid-file={m}/pid", f"--seed-file={m}/seed"])
        self._daemon(["slurmctld", "-i"], node=self.nodes[0])
        for node in self.nodes:
            self._daemon(["slurmd", "-N", node], node=node)
        self.wait_for(lambda: self.idle_nodes() == len(self.nodes), 60, "the nodes to come up idle")

    def _make_namespaces(self):
        tag = os.path.basename(self.dir)[-6:].replace("_", "x")
        addresses = {}
        for i, node in enumerate(self.nodes):
            self.namespaces[node] = f"distrnn-{tag}-{node}"
            addresses[node] = f"10.77.0.{i + 1}"
        assert len(self.nodes) == 2, "a veth pair joins two namespaces"
        (a, b), (na, nb) = self.nodes, (self.namespaces[n] for n in self.nodes)
        for ns in (na, nb):
            self._run(["ip", "netns", "add", ns])
        self.hosts_file = os.path.join(self.dir, "hosts")
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in addresses.items()))
        self._run(["ip", "link", "add", f"veth-{tag}a", "netns", na, "type", "veth", "peer", "name",
                   f"veth-{tag}b", "netns", nb])
        self.links = {a: f"veth-{tag}a", b: f"veth-{tag}b"}
        for node, ns, dev in ((a, na, f"veth-{tag}a"), (b, nb, f"veth-{tag}b")):
            self._run(["ip", "-n", ns, "addr", "add", f"{addresses[node]}/24", "dev", dev])
            self._run(["ip", "-n", ns, "link", "set", dev, "up"])
            self._run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return addresses

    def _in(self, node, command, daemon=False):
        ns = self.namespaces.get(node)
        if not ns:
            return list(command)
        enter = ["nsenter", f"--net=/run/netns/{ns}"]
        if not daemon:
            return [*enter, *command]
        return [*enter, "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"', self.hosts_file, node,
                *command]

    def _run(self, command):
        proc = subprocess.run(command, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(command)}: {proc.stderr}"

    def _daemon(self, command, node=None):
        """Starts a daemon in the foreground of its own process, so the cluster can stop it."""
        full = self._in(node, [*command, "-F" if command[0] == "munged" else "-D"], daemon=True)
        log = open(os.path.join(self.dir, "log", f"{command[0]}-{node or 'host'}.out"), "w")
        self.processes.append(subprocess.Popen(full, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def stop(self):
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = []
        if self.dir:  # jobs' processes (slurmstepd and what it started) outlive a stopped slurmd
            for proc in psutil.process_iter():
                try:
                    if proc.pid != os.getpid() and proc.environ().get("SLURM_CONF") == self.conf:
                        proc.kill()
                except (psutil.Error, AttributeError):
                    pass
        for ns in self.namespaces.values():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.namespaces = {}

    def kill_node(self, node):
        """The node dies as at a power loss: every process of its namespace (slurmd, slurmstepd, the job's
        tasks) killed -9; then it is marked down, as a health check or an administrator does (slurmctld
        would notice by itself only after SlurmdTimeout, 300 s)."""
        for pid in subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True,
                                  text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        self.command("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=killed by the test")

    def revive_node(self, node):
        """A dead node back: its slurmd started again and the node returned to service."""
        if self.state_of(node) != "DOWN":
            return
        self._daemon(["slurmd", "-N", node], node=node)
        self.command("scontrol", "update", f"NodeName={node}", "State=RESUME")
        self.wait_for(lambda: self.idle_nodes() == len(self.nodes), 120, f"{node} to come back idle")

    # --- the link between the nodes (netns=True) -------------------------------------------------------
    def shape(self, mbit=None):
        """Each direction of the nodes' veth pair limited to `mbit` Mbit/s by an htb class on its sending end
        (None: unshaped). Bandwidth only: this kernel has no netem or tbf to add delay. The burst is a
        millisecond's bytes, so that the class reaches its rate at 10 Gbit/s too (htb's default, 1,600 bytes,
        holds it back where the timer's ticks are coarser than a packet's time)."""
        for node, dev in self.links.items():
            ns = self.namespaces[node]
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if mbit:
                burst = max(1600, int(mbit * 1e6 / 8 / 1000))
                self._run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default",
                           "10"])
                self._run(["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                           "rate", f"{mbit}mbit", "ceil", f"{mbit}mbit", "burst", str(burst), "cburst",
                           str(burst), "quantum", "60000"])

    def sent_bytes(self) -> dict:
        """Bytes each node has sent over the link so far (its veth end's counter: payload and headers)."""
        sent = {}
        for node, dev in self.links.items():
            out = subprocess.run(["ip", "-s", "-j", "-n", self.namespaces[node], "link", "show", dev],
                                 capture_output=True, text=True, check=True).stdout
            sent[node] = json.loads(out)[0]["stats64"]["tx"]["bytes"]
        return sent

    def in_node(self, node, command) -> list:
        """`command` as run inside the node's network namespace."""
        return self._in(node, command)

    def remove(self):
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- using it ----------------------------------------------------------------------------
    def command(self, *args, check=True, timeout=60, env=None, cwd=None):
        """Runs a Slurm client command (sbatch, scontrol, ...) where the controller is reachable."""
        args = [str(a) for a in args]
        proc = subprocess.run(self._in(self.nodes[0], args), env=dict(self.env, **(env or {})), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def sbatch(self, *args, env=None, cwd=None) -> str:
        out = self.command("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job(self, job_id) -> dict:
        """scontrol show job, as a dict of its KEY=VALUE fields."""
        text = self.command("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def state_of(self, node) -> str:
        """The node's state as sinfo names it (IDLE, ALLOCATED, DOWN, ...)."""
        return self.command("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip().upper().rstrip("*")

    def idle_nodes(self) -> int:
        proc = self.command("sinfo", "-h", "-t", "idle", "-o", "%D", check=False)
        return int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0

    def wait_for(self, condition, timeout, what):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def wait_for_state(self, job_id, states, timeout):
        self.wait_for(lambda: self.job(job_id).get("JobState") in states, timeout,
                      f"job {job_id} to reach {'/'.join(states)}")
        return self.job(job_id)

    def logs(self) -> str:
        """The daemons' logs' last lines, for a failure's message."""
        out = []
        for name in sorted(os.listdir(os.path.join(self.dir, "log"))):
            with open(os.path.join(self.dir, "log", name), errors="replace") as f:
                out.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
        return "\n".join(out)
