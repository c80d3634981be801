"""What Slurm tells a job about its nodes and tasks, in the forms Horovod needs (the command line
over it is distrnn.slurm).

Slurm writes node lists compressed (`gpu[01-03,07],cpu5`) and task counts
run-length encoded (`4(x2),2`: four tasks on each of two nodes, then two).
This module expands them, and lays out a task of an srun step the way
horovodrun lays out its processes (`SrunTask`): global rank from
SLURM_PROCID, local rank from SLURM_LOCALID, and the cross rank (this task's
index among the tasks with the same local rank on other nodes).

Pure functions over an environment mapping: nothing here imports Horovod or
TensorFlow (distrnn.parallel joins the step).
"""
import dataclasses
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

from distrnn.config import env_number, read_number, shown
from distrnn.errors import UsageError
from distrnn.parallel.batch import global_batch_in, most_workers


MAX_NODES = 100_000  # more than any Slurm cluster has: a longer list is junk, not an allocation to expand


def _too_many(what: str, text: str, count: int) -> UsageError:
    return UsageError(f"cannot read the Slurm {what} {text!r}: it names {count:,} nodes, more than the "
                      f"{MAX_NODES:,} any allocation has")


def expand_nodelist(nodelist: str) -> List[str]:
    """`gpu[01-03,07],cpu5` -> gpu01 gpu02 gpu03 gpu07 cpu5. Zero padding follows each range's
    first number (`n[9-11]` -> n9 n10 n11, `n[09-11]` -> n09 n10 n11); several brackets in one
    name expand as a product (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2), in Slurm's order."""
    names = []
    for item in _split_top_level(nodelist.strip(), nodelist):
        expanded = [""]
        # A name is text and an optional bracket, repeated (findall ends with an empty match).
        for text, bracket in re.findall(r"([^\[\]]*)(\[[^\[\]]*\])?", item):
            suffixes = [text + n for n in _expand_ranges(bracket[1:-1], nodelist)] if bracket else [text]
            if len(names) + len(expanded) * len(suffixes) > MAX_NODES:
                raise _too_many("node list", nodelist, len(names) + len(expanded) * len(suffixes))
            expanded = [e + s for e in expanded for s in suffixes]
        names.extend(expanded)
    if not names or any(not n or "[" in n or "]" in n for n in names):
        raise UsageError(f"cannot read the Slurm node list {nodelist!r}: expected names such as "
                         f"gpu[01-03,07],cpu5")
    return names


def _split_top_level(text: str, whole: str) -> List[str]:
    """Splits on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UsageError(f"cannot read the Slurm node list {whole!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"cannot read the Slurm node list {whole!r}: unbalanced brackets")
    return items + [text[start:]]


def _expand_ranges(ranges: str, whole: str) -> List[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UsageError(f"cannot read the Slurm node list {whole!r}: bad range {part!r} (expected "
                             f"N or N-M with N <= M)")
        first, last = m.group(1), m.group(2) or m.group(1)
        if len(out) + int(last) - int(first) + 1 > MAX_NODES:
            raise _too_many("node list", whole, len(out) + int(last) - int(first) + 1)
        out.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return out


def expand_tasks_per_node(counts: str) -> List[int]:
    """`4(x2),2` -> [4, 4, 2] (SLURM_TASKS_PER_NODE's run-length form)."""
    out = []
    for part in counts.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m or int(m.group(1)) < 1:
            raise UsageError(f"cannot read the Slurm task counts {counts!r}: expected counts such as 4(x2),2")
        if len(out) + int(m.group(2) or 1) > MAX_NODES:
            raise _too_many("task counts", counts, len(out) + int(m.group(2) or 1))
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _need(env: Mapping[str, str], *names: str) -> str:
    """The first of `names` that is set (to more than blanks)."""
    for name in names:
        if env.get(name, "").strip():
            return env[name]
    raise UsageError(f"{names[0]} is not set: run this inside a Slurm allocation (sbatch, salloc or srun)")


def node_slots(env: Mapping[str, str] = os.environ) -> List[tuple]:
    """[(node, tasks on it), ...] of the allocation (or of the step, inside srun): the nodes from
    SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, the counts from SLURM_STEP_TASKS_PER_NODE /
    SLURM_TASKS_PER_NODE, or SLURM_NTASKS_PER_NODE on every node."""
    in_step = "SLURM_STEP_NODELIST" in env
    nodes = expand_nodelist(_need(env, "SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE" if in_step else "SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
    elif env.get("SLURM_NTASKS_PER_NODE"):
        counts = expand_tasks_per_node(env["SLURM_NTASKS_PER_NODE"]) * len(nodes)
    else:
        raise UsageError("neither SLURM_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE is set: ask for tasks with "
                         "sbatch --ntasks-per-node=N (one per GPU)")
    if len(counts) != len(nodes):
        raise UsageError(f"Slurm lists {len(nodes)} node(s) but task counts for {len(counts)} "
                         f"({per_node or env.get('SLURM_NTASKS_PER_NODE')!r})")
    return list(zip(nodes, counts))


def horovod_hosts(env: Mapping[str, str] = os.environ) -> str:
    """The allocation as horovodrun's -H list: `gpu01:4,gpu02:4,gpu03:2`."""
    return ",".join(f"{node}:{count}" for node, count in node_slots(env))


@dataclasses.dataclass(frozen=True)
class SrunTask:
    """One task of an srun step, laid out as horovodrun lays out its processes."""
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    node: str
    slots: tuple  # ((node, tasks), ...) of the whole step

    @property
    def hosts(self) -> str:
        return ",".join(f"{node}:{count}" for node, count in self.slots)


def srun_task(env: Mapping[str, str] = os.environ) -> Optional[SrunTask]:
    """This process's place in its srun step, or None outside a step of several tasks (a batch
    script, a one-task step, a plain shell)."""
    if "SLURM_STEP_ID" not in env or env_number(env, "SLURM_STEP_NUM_TASKS", 1, minimum=0) < 2:
        return None
    slots = node_slots(env)
    counts = [count for _, count in slots]
    node_id = _task_number(env, "SLURM_NODEID", len(counts), "node(s)")
    local_rank = _task_number(env, "SLURM_LOCALID", counts[node_id], f"task(s) on node {slots[node_id][0]}")
    rank = _task_number(env, "SLURM_PROCID", sum(counts), "task(s)")
    # Cross rank: among the nodes that run a task with this local rank, this node's index.
    with_local_rank = [i for i, count in enumerate(counts) if count > local_rank]
    return SrunTask(rank=rank, size=sum(counts), local_rank=local_rank,
                    local_size=counts[node_id], cross_rank=with_local_rank.index(node_id),
                    cross_size=len(with_local_rank), node=slots[node_id][0], slots=tuple(slots))


def _task_number(env: Mapping[str, str], name: str, count: int, what: str) -> int:
    """An index Slurm gives a task (0 ... count-1 of the step's `what`), read as every number is."""
    text = _need(env, name)
    try:
        return read_number(text, int, minimum=0, maximum=count - 1)
    except ValueError as e:
        raise UsageError(f"environment variable {name}={shown(text)}: {str(e).split(', got')[0]} (the step has {count} "
                         f"{what}); srun sets it: run distrnn as one of its tasks") from None


# The #SBATCH requests that a script's stated hardware, time and expected figures rest on, and the
# variable in which sbatch tells the batch script what it got (the time limit is asked of squeue).
HEADER_REQUESTS = (("nodes", "SLURM_JOB_NUM_NODES"), ("ntasks-per-node", "SLURM_NTASKS_PER_NODE"),
                   ("cpus-per-task", "SLURM_CPUS_PER_TASK"), ("gpus-per-node", "SLURM_GPUS_PER_NODE"),
                   ("time", None))


def step_tasks(nodes: int, args: List[str], env: Mapping[str, str] = os.environ) -> Tuple[int, str]:
    """How many tasks an srun step on `nodes` of the allocation's nodes runs, and a line saying why where it
    is fewer than they hold: as many a node as the allocation has (SLURM_NTASKS_PER_NODE, else its first
    node's count in SLURM_TASKS_PER_NODE), fewer where the global batch of the command `args` would not
    split evenly over them."""
    if nodes < 1:
        raise UsageError(f"{nodes} nodes: an srun step needs at least one")
    per_node = env_number(env, "SLURM_NTASKS_PER_NODE", 0, minimum=0, maximum=MAX_NODES)
    if not per_node:
        per_node = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])[0] if env.get("SLURM_TASKS_PER_NODE") else 1
    batch = global_batch_in(args)
    tasks = most_workers(batch, nodes * per_node)
    why = (f"{tasks} of the {nodes * per_node} tasks {nodes} node(s) hold: the global batch of {batch} splits "
           f"evenly over {tasks}" if tasks < nodes * per_node else "")
    return tasks, why


def sbatch_header(text: str) -> Dict[str, str]:
    """The long options of a batch script's #SBATCH lines, read as sbatch reads them: up to the
    first line that is neither blank nor a comment; `--name=value` or `--name value`."""
    options = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            break
        words = line[len("#SBATCH"):].split() if line.startswith("#SBATCH") else []
        if words and words[0].startswith("--"):
            name, _, value = words[0][2:].partition("=")
            options[name] = value or (words[1] if len(words) > 1 else "")
    return options


def time_seconds(limit: str) -> Optional[int]:
    """A Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None for UNLIMITED
    or what is not one."""
    days, _, rest = limit.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        day_seconds = int(days) * 86400 if days else 0
    except ValueError:
        return None
    if days:  # after a day count, the first field is hours
        parts += [0] * (3 - len(parts))
        return day_seconds + parts[0] * 3600 + parts[1] * 60 + parts[2] if len(parts) == 3 else None
    scales = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}.get(len(parts))
    return sum(p * s for p, s in zip(parts, scales)) if scales else None


def header_differences(header: Mapping[str, str], env: Mapping[str, str] = os.environ,
                       time_limit: Optional[str] = None) -> List[str]:
    """`--NAME GOT (header: ASKED)` for each of HEADER_REQUESTS the job got otherwise than its
    #SBATCH header asked (overridden on the sbatch command line); what is unknown is left out."""
    differences = []
    for name, variable in HEADER_REQUESTS:
        asked, got = header.get(name), time_limit if variable is None else env.get(variable)
        if not asked or not got:
            continue
        if name == "time":
            same = time_seconds(asked) == time_seconds(got)
        else:  # a GPU count may carry a type: --gpus-per-node=a100:4
            same = asked.rpartition(":")[2] == got.rpartition(":")[2]
        if not same:
            differences.append(f"--{name} {got} (header: {asked})")
    return differences


def header_report(script: str, env: Mapping[str, str] = os.environ, time_limit: Optional[str] = None) -> str:
    """The line a batch script logs when its allocation is not what its header asked for, or ''."""
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            header = sbatch_header(f.read())
    except OSError as e:
        raise UsageError(f"cannot read the batch script {script} ({e.strerror})") from None
    differences = header_differences(header, env, time_limit)
    if not differences:
        return ""
    return ("[slurm] this allocation is not what the script's #SBATCH header asks for: " + ", ".join(differences)
            + "; the hardware, time and figures its header comment states assume the header")
