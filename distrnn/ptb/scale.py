"""`distrnn.devices --plan --gpus 1,8,64,512 --gpu h100 --link ndr`: how far PTB training scales, before
anyone rents the GPUs. For each number of GPUs and each strategy (data parallel; ranks of one GPU a layer,
pipelined, data parallel across them): words/sec, scaling efficiency, time per epoch and for the preset's
schedule, memory per GPU, and what bounds the step, from the cost model (distrnn.scaling.model) and the
memory estimate (distrnn.memory.estimates). TensorFlow-free."""
import dataclasses
from typing import List, Optional

from distrnn import names
from distrnn.errors import UsageError
from distrnn.memory import estimates
from distrnn.memory.estimates import GPU_RUNTIME_MIB
from distrnn.memory.nvml import MIB
from distrnn.ptb.configs import PRESETS
from distrnn.scaling import model as cost

TRAIN_WORDS = 929_589  # the full PTB's training words (ptb.train.txt with an end-of-sentence a line)
STRATEGIES = ("data", "pipeline")


def scaling_plan(config_name: str, gpu_counts: List[int], cluster: cost.Cluster, precision: str = "float32",
                 global_batch: int = 0, fp16_allreduce: bool = False, vocab_size: int = 10000,
                 assumptions: cost.Assumptions = cost.Assumptions()) -> dict:
    """Rows of (GPUs, strategy): the step's cost and what follows from it. Each rank trains the preset's
    batch (the global batch grows with the ranks, as Horovod's benchmarks scale), or its share of
    `global_batch` where that is given (sizes it does not split over are left out)."""
    config = PRESETS.get(config_name)
    if names.CELL_KINDS[config.cell].gates != cost.GATES:
        raise UsageError(f"--plan --gpus models LSTM layers; the {config_name} preset's cell is {config.cell}")
    shapes = cost.Model(config.hidden_size, config.num_layers, config.num_steps, vocab_size)
    one = cost.step(shapes, 1, cluster, global_batch or config.batch_size, False, precision, fp16_allreduce,
                    assumptions)
    rows = []
    for gpus in sorted(set(gpu_counts)):
        for strategy in STRATEGIES:
            per_rank = config.num_layers if strategy == "pipeline" else 1
            if gpus % per_rank or (strategy == "pipeline" and per_rank == 1):
                continue
            ranks = gpus // per_rank
            batch = global_batch // ranks if global_batch else config.batch_size
            if not batch or (global_batch and global_batch % ranks):
                continue
            step = cost.step(shapes, gpus, cluster, batch, strategy == "pipeline", precision, fp16_allreduce,
                             assumptions)
            rows.append(dict(step, strategy=strategy, memory_gib=_memory_gib(config, vocab_size, batch, per_rank,
                                                                               precision)))
    if not rows:
        raise UsageError(f"--global_batch_size {global_batch} splits evenly over the ranks of none of --gpus "
                         f"{','.join(map(str, gpu_counts))}: give a multiple of the ranks, or leave it out")
    for row in rows:
        row["efficiency"] = row["words_per_sec"] / (row["gpus"] * one["words_per_sec"])
        row["epoch_s"] = TRAIN_WORDS / row["words_per_sec"]
        row["fits"] = row["memory_gib"] <= cluster.gpu.memory_gib
    return {"config": config_name, "settings": dataclasses.asdict(config), "vocab_size": vocab_size,
            "precision": precision, "epochs": config.max_max_epoch, "global_batch": global_batch,
            "fp16_allreduce": fp16_allreduce, "cluster": dataclasses.asdict(cluster),
            "assumptions": dataclasses.asdict(assumptions), "rows": rows}


def _memory_gib(config, vocab_size: int, rows: int, per_rank: int, precision: str) -> float:
    """The most one GPU of a rank holds: every part, or (pipelined) its layer with the embedding on the first
    GPU and the softmax on the last."""
    parts = [p.total for p in estimates.lm_memory(vocab_size, config.hidden_size, config.num_layers, rows,
                                                  config.num_steps, cost.GATES, config.keep_prob < 1.0,
                                                  precision=precision)]
    if per_rank == 1:
        most = sum(parts)
    else:
        layers = parts[1:-1]
        most = max(parts[0] + layers[0], parts[-1] + layers[-1], *layers)
    return (most / MIB + GPU_RUNTIME_MIB) / 1024


def duration(seconds: float) -> str:
    """1.5 s, 0:03:28, 1d 03:10 (days and hours:minutes past a day)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    hours, rest = divmod(round(seconds), 3600)
    if hours >= 24:
        return f"{hours // 24}d {hours % 24:02d}:{rest // 60:02d}"
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_scaling(r: dict) -> str:
    c, cl = r["settings"], r["cluster"]
    batch = (f"global batch {r['global_batch']}" if r["global_batch"] else
             f"{c['batch_size']} rows a rank (the global batch grows with the ranks; see --lr_scaling)")
    lines = [f"scaling plan: PTB {r['config']} ({c['num_layers']} x {c['hidden_size']} LSTM, {c['num_steps']} steps, "
             f"vocabulary {r['vocab_size']:,}), {r['precision']}"
             f"{', float16 gradients' if r['fp16_allreduce'] else ''}, "
             f"{batch}",
             f"on {cl['gpu']['name']}, {cl['gpus_per_node']} a node: {cl['intra']['name']} within, "
             f"{cl['inter']['name']} between",
             f"  {'GPUs':>5} {'strategy':<9} {'ranks':>5} {'batch':>6} {'words/sec':>11} {'efficiency':>10} "
             f"{'epoch':>9} {r['epochs']:>3} epochs {'GiB/GPU':>8} {'embedding':<9}  bound"]
    for row in r["rows"]:
        efficiency = f"{row['efficiency']:.2f}"
        memory = f"{row['memory_gib']:.1f}" + ("" if row["fits"] else "!")
        lines.append(f"  {row['gpus']:>5} {row['strategy']:<9} {row['ranks']:>5} {row['global_batch']:>6} "
                     f"{row['words_per_sec']:>11,.0f} {efficiency:>10} {duration(row['epoch_s']):>9} "
                     f"{duration(row['epoch_s'] * r['epochs']):>10} {memory:>8} {row['embedding']:<9}  {row['bound']}")
    if any(not row["fits"] for row in r["rows"]):
        lines.append(f"! more than the GPU's {cl['gpu']['memory_gib']:g} GiB: see --plan --num_gpus for the memory "
                     "modes")
    if any(row["embedding"] == "dense" for row in r["rows"]):
        lines.append("embedding dense: its gradient all-reduced as one tensor beats gathering every rank's rows "
                     "there: train with --sparse_as_dense")
    lines.append("(a model from the shapes and the datasheets, calibrated on a CPU, not on GPUs (docs/scaling.md): "
                 "--matmul_efficiency and the other figure flags take your own numbers)")
    return "\n".join(lines)


def plot_efficiency(r: dict, path: str) -> None:
    """Scaling efficiency against GPUs, a line a strategy, as PNG."""
    from distrnn.run.files import save_lines
    lines = {strategy: [(row["gpus"], row["efficiency"]) for row in r["rows"] if row["strategy"] == strategy]
             for strategy in STRATEGIES}
    title = (f"PTB {r['config']} on {r['cluster']['gpu']['name']}, {r['cluster']['gpus_per_node']} a node\n"
             f"{r['cluster']['inter']['name']} between nodes")
    save_lines(path, lines, title, "GPUs", "scaling efficiency", log_x=2, ylim=(0, 1.05), rule=0.8)


def gpu_counts(text: str) -> List[int]:
    """--gpus 1,8,64,512: positive GPU counts, at most 65,536."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--gpus {text}: give GPU counts separated by commas, e.g. 1,8,64,512") from None
    if not counts or any(n < 1 or n > 65536 for n in counts):
        raise UsageError(f"--gpus {text}: each count from 1 to 65,536")
    return counts


def cluster_from(gpu_name: str, link_name: str, node_link: Optional[str], gpus_per_node: int,
                 overrides: dict) -> cost.Cluster:
    """The cluster the flags name, with the user's own figures in place of the tables' where given."""
    from distrnn.scaling import hardware
    gpu = hardware.gpu(gpu_name)
    intra = hardware.link(node_link or ("pcie3" if gpu_name.lower() == "k20" else "nvlink"))
    inter = hardware.link(link_name)
    def own(entry, prefix: str, fields):
        return dataclasses.replace(entry, **{k: overrides[prefix + k] for k in fields if overrides.get(prefix + k)})
    gpu = own(gpu, "gpu_", ("float32_tflops", "float16_tflops", "memory_gib", "memory_gbps"))
    inter = own(inter, "link_", ("gbps", "latency_us"))
    return cost.Cluster(gpu, intra, inter, gpus_per_node)
