"""The scaling model against published figures it can be fed exactly.

    python -m distrnn.scaling.anchors [--json]

Horovod's 512-GPU benchmark (docs/benchmarks.rst of horovod/horovod: 128 servers of 4 Pascal GPUs, RoCE-capable
25 Gbit/s, tf_cnn_benchmarks at 64 images a GPU, synthetic data): 90% scaling efficiency for Inception V3 and
ResNet-101, 68% for VGG-16. The model is fed each network's parameters (float32 gradients), its speed on one
P100 at batch 64 (TensorFlow's benchmark page, DGX-1, synthetic data, May 2017; ResNet-101 is not on it: between
ResNet-50's 219 and ResNet-152's 91.8 images/sec by its layers' multiply-adds, 7.6 of 3.8 and 11.3 GFLOPs), and
the order in which its gradients are ready in the backward pass: the classifier's first (for VGG-16 the three
fully connected layers, 89% of its weights), the convolutions' spread evenly over the rest. Horovod sends them as
they are ready, in fused all-reduces of up to 64 MB, each paying the ring's latencies; the backward pass is taken
as 2/3 of the step.

Zaremba et al. 2014 on PTB large: "an entire day" on one K20 for 55 epochs; that anchor is the planner's own
row (`python -m distrnn.devices --plan --config large --gpus 1 --gpu k20`).
"""
import argparse
import dataclasses
import json
import sys
from typing import List

from distrnn import cli
from distrnn.scaling import hardware, model

PAPERS = {
    "horovod": "horovod/horovod docs/benchmarks.rst: 128 servers x 4 Pascal GPUs, RoCE-capable 25 Gbit/s",
    "tensorflow": "tensorflow.org/performance/benchmarks (May 2017): NVIDIA DGX-1, P100, batch 64, synthetic data",
}


@dataclasses.dataclass(frozen=True)
class Network:
    name: str
    weights: int               # parameters (Keras applications' counts)
    classifier_weights: int    # those whose gradients are ready first in the backward pass
    images_per_sec: float      # on one P100 at batch 64
    published: float           # Horovod's scaling efficiency at 512 GPUs


NETWORKS = (
    Network("Inception V3", 23_851_784, 2048 * 1000 + 1000, 142, 0.90),
    Network("ResNet-101", 44_707_176, 2048 * 1000 + 1000, 1 / (1 / 219 + (7.6 - 3.8) / (11.3 - 3.8)
                                                               * (1 / 91.8 - 1 / 219)), 0.90),
    Network("VGG-16", 138_357_544, 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000, 154, 0.68),
)
BATCH = 64
GPUS = 512
CLUSTER = model.Cluster(None, hardware.link("pcie3"), hardware.link("25gbe"), gpus_per_node=4)
SPREAD = 16  # the convolutions' gradients as this many groups, ready evenly over the backward pass


def efficiency(net: Network, gpus: int = GPUS, cluster: model.Cluster = CLUSTER) -> float:
    """The model's weak-scaling efficiency of `net` on `gpus` GPUs under Horovod."""
    step = BATCH / net.images_per_sec
    fusion = model.engine_assumptions("horovod").fusion_mb * 1e6

    def seconds(weights: float) -> float:
        return model.ring_allreduce_seconds(weights * model.WEIGHT_BYTES, gpus, cluster.gpus_per_node, cluster.intra,
                                            cluster.inter, fusion_bytes=fusion)

    rest = net.weights - net.classifier_weights
    chunks = [(0.0, seconds(net.classifier_weights))] + [((k + 1) / SPREAD, seconds(rest / SPREAD))
                                                         for k in range(SPREAD)]
    return step / (step + model.exposed_after_backward(chunks, step * model.BACKWARD_SHARE))


def table() -> List[dict]:
    rows = []
    for n in NETWORKS:
        e = efficiency(n)
        rows.append({"network": n.name, "weights": n.weights, "images_per_sec": round(n.images_per_sec, 1),
                     "model": round(e, 3), "published": n.published, "points": round(100 * (e - n.published), 1)})
    return rows


def main(argv=None) -> int:
    def anchors():
        parser = cli.ArgumentParser(prog="distrnn.scaling.anchors", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--json", action="store_true", help="the table as JSON")
        args = parser.parse_args(argv)
        print(json.dumps(table()) if args.json else format_table(table()))
        return 0
    return cli.run_main("distrnn.scaling.anchors", anchors)


def format_table(rows: List[dict]) -> str:
    lines = [f"Horovod's benchmark, {GPUS} GPUs ({PAPERS['horovod']}); one GPU's speed: {PAPERS['tensorflow']}",
             f"  {'network':<13} {'weights':>12} {'images/s':>9} {'model':>6} {'published':>9} {'points':>7}"]
    for r in rows:
        lines.append(f"  {r['network']:<13} {r['weights']:>12,} {r['images_per_sec']:>9.1f} {r['model']:>6.1%} "
                     f"{r['published']:>9.0%} {r['points']:>+7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
