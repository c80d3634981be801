"""What Slurm tells a job about its nodes and tasks, in the forms Horovod needs.

    python -m distrnn.slurm hosts    # gpu01:4,gpu02:4,gpu03:2  (horovodrun -H)
    python -m distrnn.slurm np       # 10                       (horovodrun -np)
    python -m distrnn.slurm header "$0" --time_limit LIMIT   # in a batch script: what differs from its header
    python -m distrnn.slurm tasks NODES COMMAND...   # 8  (srun --ntasks on NODES nodes, the command's global
                                                     #     batch split evenly; slurm/job.sh's distrnn_srun)

The reading itself is distrnn.parallel.slurm_env (pure functions, imported by the jobs); this is its command line.
"""
import sys

from distrnn import cli
from distrnn.options import number
from distrnn.parallel.slurm_env import MAX_NODES, header_report, horovod_hosts, node_slots, step_tasks


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m distrnn.slurm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="what", required=True, metavar="{hosts,np,header,tasks}")
    commands.add_parser("hosts", help="the allocation as horovodrun's -H list")
    commands.add_parser("np", help="the number of tasks")
    header = commands.add_parser("header", help="inside a batch job: one line naming what the allocation got "
                                                "otherwise than SCRIPT's #SBATCH header asked (nothing if alike)")
    header.add_argument("script", help="the batch script ($0 inside it)")
    header.add_argument("--time_limit", help="the job's time limit (squeue -h -j $SLURM_JOB_ID -o %%l)")

    tasks = commands.add_parser("tasks", help="inside a batch job: how many tasks an srun step of COMMAND runs on "
                                              "NODES nodes (as many a node as the allocation has, fewer where "
                                              "the command's --global_batch_size would not split evenly)")
    tasks.add_argument("nodes", type=number(int, minimum=1, maximum=MAX_NODES), help="the nodes the step runs on")
    tasks.add_argument("step", nargs="...", help="the command the step runs")

    def show():
        args = parser.parse_args(argv)
        if args.what == "tasks":
            count, why = step_tasks(args.nodes, args.step)
            print(count)
            if why:
                print(f"[slurm] {why}", file=sys.stderr)
        elif args.what == "header":
            report = header_report(args.script, time_limit=args.time_limit)
            if report:
                print(report)
        else:
            print(horovod_hosts() if args.what == "hosts" else sum(count for _, count in node_slots()))
    return cli.run_main(parser.prog, show)


if __name__ == "__main__":
    sys.exit(main())
