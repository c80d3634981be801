"""`python -m distrnn.ptb`: flags in, `train.train_and_evaluate` out.

    python -m distrnn.ptb --config small --data_path DIR [--hidden_size 100 ...]
"""
import os
import sys

from distrnn import cli, distributed, placement
from distrnn.config import override


def build_parser():
    from distrnn.ptb.configs import PTBConfig, PRESETS
    parser = cli.ArgumentParser(
        prog="python -m distrnn.ptb",
        description="Train the PTB word language model of Zaremba et al. 2014 with distrnn's stacked LSTM.")
    parser.add_argument("--config", default="small", help=f"preset: {', '.join(PRESETS.names())} (default small)")
    parser.add_argument("--list_configs", action="store_true", help="print the presets with their published results and exit")
    parser.add_argument("--data_path", help="directory with ptb.train.txt, ptb.valid.txt, ptb.test.txt, read as it "
                        "is; default: ~/.cache/distrnn/ptb, downloaded and checksummed when missing")
    parser.add_argument("--save_path", help="where checkpoints, TensorBoard logs and the perplexity plot go "
                        "(default runs/ptb-CONFIG-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save_path "
                        "(starts fresh when there is none)")
    parser.add_argument("--max_epochs", type=int, default=0, help="stop after N epochs in all (default: the preset's)")
    parser.add_argument("--max_steps", type=int, default=0, help="stop after N training steps in all")
    parser.add_argument("--metrics_json", help="write the final figures to this JSON file")
    parser.add_argument("--seed", type=int, default=1, help="seed for weights and dropout (default 1)")
    parser.add_argument("--checkpoint_every", type=int, default=500,
                        help="steps between checkpoints; one is also saved after every epoch (default 500)")
    devices = parser.add_argument_group("devices (model parallelism)")
    devices.add_argument("--devices", help="comma-separated devices for the model's parts, e.g. /gpu:0,/gpu:1")
    devices.add_argument("--num_gpus", type=int, default=0, help="use /gpu:0 ... /gpu:N-1")
    devices.add_argument("--virtual_devices", type=int, default=0,
                         help="split the CPU into N logical devices and place the model on them")
    devices.add_argument("--strategy", default="round_robin", choices=placement.STRATEGIES,
                         help="how parts are mapped to devices (default round_robin)")
    devices.add_argument("--placement", default="sequential", choices=placement.PLACEMENTS,
                         help="sequential: one layer after another; pipeline: a wavefront so all devices work at "
                              "once (default sequential)")
    ranks = parser.add_argument_group("several processes (under horovodrun)")
    ranks.add_argument("--gpus_per_rank", type=int, default=0,
                       help="GPUs each rank owns (rank r: local GPUs r*K ... r*K+K-1), its layers placed across them; "
                            "default one GPU per rank")
    ranks.add_argument("--global_batch_size", type=int, default=0,
                       help="rows of one step over all ranks, split evenly (default: batch_size x ranks)")
    ranks.add_argument("--sparse_as_dense", action="store_true",
                       help="allreduce the embedding gradient as a dense tensor instead of allgathering its rows")
    ranks.add_argument("--lr_scaling", default="none", choices=distributed.LR_SCALINGS,
                       help="scale the learning rate with global batch / batch_size (default none: see README)")
    ranks.add_argument("--lr_warmup_steps", type=int, default=0,
                       help="reach the scaled learning rate linearly over N steps")
    mem = parser.add_argument_group("memory")
    mem.add_argument("--mem_warn", type=float, default=0.90,
                     help="warn once when a GPU's or the host's memory in use reaches this fraction (default 0.90)")
    mem.add_argument("--mem_stop", type=float, default=0.97,
                     help="save a checkpoint and exit with code 76 when it reaches this fraction (default 0.97)")
    mem.add_argument("--mem_interval", type=float, default=5.0, help="seconds between memory samples (default 5)")
    mem.add_argument("--recompute", type=int, default=0, metavar="K",
                     help="backprop through time keeps every K-th LSTM state and recomputes the rest (K near "
                          "sqrt(num_steps): least memory; about one more forward pass of time)")
    mem.add_argument("--swap_memory", action="store_true",
                     help="backprop through time keeps the LSTM activations in host memory, fetched back segment by "
                          "segment (GPU memory of about two segments)")
    mem.add_argument("--on_oom", default="stop", choices=("stop", "retry"),
                     help="a step that runs out of memory: stop (checkpoint, exit 76; default) or retry it with "
                          "--recompute, then --swap_memory, and go on (one process only)")
    names = cli.add_config_flags(parser, PTBConfig, cli.field_comments(PTBConfig))
    return parser, names


def list_configs() -> None:
    import dataclasses
    from distrnn.ptb.configs import PRESETS, PUBLISHED
    for name in PRESETS.names():
        ppl, cost = PUBLISHED[name]
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(PRESETS.get(name)).items())
        print(f"{name:7s} published test ppl {ppl if ppl else '-'}; {cost}\n        {fields}")


def run(argv) -> int:
    parser, names = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        list_configs()
        return 0
    for flag in ("max_epochs", "max_steps", "checkpoint_every", "num_gpus", "virtual_devices", "global_batch_size",
                 "lr_warmup_steps", "gpus_per_rank", "recompute"):
        value = getattr(args, flag)
        if value < 0 or (flag == "checkpoint_every" and value == 0):
            raise cli.UsageError(f"--{flag} must be {'positive' if flag == 'checkpoint_every' else '>= 0'}, got {value}")
    if not 0 < args.mem_warn <= args.mem_stop <= 1:
        raise cli.UsageError(f"memory thresholds must satisfy 0 < --mem_warn <= --mem_stop <= 1, got --mem_warn "
                             f"{args.mem_warn:g} --mem_stop {args.mem_stop:g}")
    if args.mem_interval <= 0:
        raise cli.UsageError(f"--mem_interval must be positive, got {args.mem_interval:g}")
    if args.recompute and args.swap_memory:
        raise cli.UsageError("--recompute and --swap_memory are alternatives: recompute keeps less, swap keeps all "
                             "of it on the host; pass one of them")
    from distrnn.ptb.configs import PRESETS
    config = override(PRESETS.get(args.config), cli.config_overrides(args, names))
    # TensorFlow is imported only once the flags are known to be good.
    from distrnn.ptb.train import RunOptions, train_and_evaluate
    options = RunOptions(data_path=args.data_path, save_path=args.save_path, resume=args.resume,
                         max_epochs=args.max_epochs, max_steps=args.max_steps, metrics_json=args.metrics_json,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, config_name=args.config,
                         devices=args.devices, num_gpus=args.num_gpus, virtual_devices=args.virtual_devices,
                         strategy=args.strategy, placement=args.placement, gpus_per_rank=args.gpus_per_rank,
                         global_batch_size=args.global_batch_size, sparse_as_dense=args.sparse_as_dense,
                         lr_scaling=args.lr_scaling, lr_warmup_steps=args.lr_warmup_steps,
                         mem_warn=args.mem_warn, mem_stop=args.mem_stop, mem_interval=args.mem_interval,
                         recompute=args.recompute, swap_memory=args.swap_memory, on_oom=args.on_oom)
    metrics = train_and_evaluate(config, options)
    return metrics["interrupted"] or 0


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide TensorFlow's C++ start-up chatter
    return cli.run_main("distrnn.ptb", lambda: run(sys.argv[1:] if argv is None else argv))
