"""The GPUs and links a scaling plan can assume, each figure named with where it comes from. Every figure is
a peak a datasheet states; what a recurrent step reaches of it is the cost model's to say (model.py), and a
user's own figures replace these by flags (distrnn.devices --plan --gpu_tflops ... --link_gbps ...)."""
import dataclasses
from typing import Dict

from distrnn.errors import UsageError


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    float32_tflops: float    # peak, dense
    float16_tflops: float    # peak 16-bit matrix throughput (tensor cores), dense: float16 and bfloat16
    memory_gib: float
    memory_gbps: float       # GB/s (1e9 bytes a second)
    source: str


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    gbps: float              # GB/s each way (1e9 bytes a second), what one GPU's traffic can use
    latency_us: float        # one message's start-up, end to end
    source: str


# Datasheet peaks. "Dense": without 2:4 sparsity (NVIDIA's headline 16-bit figures from A100 on are sparse,
# twice these). The K20 has no tensor cores and runs 16-bit arithmetic no faster than float32.
GPUS: Dict[str, GPU] = {
    "k20": GPU("NVIDIA Tesla K20", 3.52, 3.52, 5, 208,
               "NVIDIA Tesla K20 board specification (BD-06455-001): 3.52 TFLOPS float32, 5 GB GDDR5, 208 GB/s"),
    "v100": GPU("NVIDIA V100 SXM2", 15.7, 125, 32, 900,
                "NVIDIA V100 datasheet (SXM2): 15.7 TFLOPS float32, 125 TFLOPS tensor, 32 GB HBM2, 900 GB/s"),
    "a100": GPU("NVIDIA A100 SXM 80GB", 19.5, 312, 80, 2039,
                "NVIDIA A100 datasheet (SXM, 80GB): 19.5 TFLOPS float32, 312 TFLOPS float16/bfloat16 dense, "
                "2,039 GB/s"),
    "h100": GPU("NVIDIA H100 SXM5", 67, 989, 80, 3350,
                "NVIDIA H100 datasheet (SXM5): 67 TFLOPS float32, 989 TFLOPS float16/bfloat16 dense (1,979 "
                "sparse), 80 GB HBM3, 3.35 TB/s"),
    "h200": GPU("NVIDIA H200 SXM", 67, 989, 141, 4800,
                "NVIDIA H200 datasheet (SXM): H100's compute, 141 GB HBM3e, 4.8 TB/s"),
}

# Bandwidth each way per GPU's share of the link; latency: typical end-to-end figures for one small
# message (NCCL or Gloo over the link), not measured here: where a measurement exists it replaces them
# (docs/scaling.md's calibration).
LINKS: Dict[str, Link] = {
    "pcie3": Link("PCIe 3.0 x16", 15.75, 5, "PCI-SIG: 8 GT/s x 16 lanes, 128b/130b: 15.75 GB/s each way"),
    "pcie4": Link("PCIe 4.0 x16", 31.5, 5, "PCI-SIG: 16 GT/s x 16 lanes, 128b/130b: 31.5 GB/s each way"),
    "nvlink": Link("NVLink 4 (H100 SXM)", 450, 3, "NVIDIA H100 datasheet: 900 GB/s NVLink, 450 GB/s each way"),
    "10gbe": Link("10 Gbit/s Ethernet", 1.25, 30, "IEEE 802.3ae: 10 Gbit/s; TCP latency typical"),
    "25gbe": Link("25 Gbit/s Ethernet (RoCE)", 3.125, 10, "IEEE 802.3by: 25 Gbit/s; RoCE latency typical"),
    "100gbe": Link("100 Gbit/s Ethernet (RoCE)", 12.5, 5, "IEEE 802.3bj: 100 Gbit/s; RoCE latency typical"),
    "hdr": Link("InfiniBand HDR", 25, 2, "InfiniBand Trade Association: HDR 200 Gbit/s (4x), ~2 us"),
    "ndr": Link("InfiniBand NDR", 50, 2, "InfiniBand Trade Association: NDR 400 Gbit/s (4x), ~2 us"),
}


def gpu(name: str) -> GPU:
    return _named(GPUS, name, "--gpu", "GPU")


def link(name: str) -> Link:
    return _named(LINKS, name, "--link", "link")


def _named(table: dict, name: str, flag: str, what: str):
    try:
        return table[name.lower()]
    except KeyError:
        raise UsageError(f"{flag} {name}: no {what} of that name; choose from {', '.join(table)} (or give your own "
                         f"figures with the {flag}_* flags)") from None
