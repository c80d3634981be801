"""`python -m distrnn.launch` (distrnn/launch/__main__.py): N processes of a distrnn job on this machine, joined by
TensorFlow's own collectives (each started with its TF_CONFIG, as tf.distribute and Kubeflow's TFJob set it;
the one engine TensorFlow 2.19 and newer have) or, with --engine horovod, by Horovod over Gloo (this
launcher serves Horovod's rendezvous and sets each worker's variables, as horovodrun does).

    python -m distrnn.launch --nproc 2 -m distrnn.ptb --config small --global_batch_size 40
    python -m distrnn.launch --engine horovod --nproc 2 -m distrnn.ptb --config small --global_batch_size 40
    bash launch/one_node.sh 2 -m distrnn.ptb ...      # horovodrun where the stack has Horovod, else the first

TensorFlow's workers listen on ports of localhost: --port P gives the first (P, P+1, ...), else free ports
are taken from the system (Horovod's rendezvous: on P, else a free port). Ctrl-C, SIGTERM and SIGUSR1 are
passed to every worker, which stop together at the same step with a checkpoint (distrnn.run.stops). When a
worker fails, the others end with exit 75 on their own (a closed connection at once, the collective
runtime's heartbeats a frozen worker in about ten seconds); any still running a minute later are killed, so
the launcher never hangs. The exit code is the first failing worker's (0 when all succeeded).

Elastic by restart (torchrun's --nnodes MIN:MAX and --max-restarts, on one machine): with --max_restarts R,
when workers die (killed, crashed, hung and killed after the grace) and the others end with exit 75 having
lost them, the survivors start again with --resume, as many as are left (fewer where the command's
--global_batch_size would not split evenly over them), while at least --min_nproc remain and restarts are
left; otherwise one line and exit 75. A run goes on at another size exactly when its global batch is kept
(docs/elastic.md). A signal to the launcher is a stop, never a restart.

    python -m distrnn.launch --nproc 3 --min_nproc 2 --max_restarts 3 -m distrnn.ptb --global_batch_size 60 \
        --save_path runs/a --resume
"""
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional

from distrnn import cli
from distrnn.errors import RankLost, UsageError
from distrnn.options import number
from distrnn.parallel import join
from distrnn.parallel.batch import global_batch_in, most_workers

GRACE_SECONDS = 60  # after a worker fails, how long the others have to end by themselves
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LOST = RankLost.exit_code  # what a worker that lost another ends with


def start_workers(workers: List[subprocess.Popen], command: List[str], nproc: int, engine: str, port: int = 0):
    """Starts the workers into `workers`, each in a session of its own: a signal reaches them through this
    launcher (once), not also from the terminal. Returns what ends the start, once its workers are gone."""
    environments, end = join.local_workers(engine, nproc, port)
    for environment in environments:
        workers.append(subprocess.Popen(command, env={**os.environ, **environment}, start_new_session=True))
    return end


def wait(workers: List[subprocess.Popen]) -> int:
    """Waits for every worker; the first failure's exit code (a signal as 128 + its number), else 0. Workers
    still running GRACE_SECONDS after one failed are killed."""
    failed_at, code = None, 0
    while any(w.poll() is None for w in workers):
        if failed_at is None and _failure(workers):
            failed_at, code = time.monotonic(), _failure(workers)
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for w in workers:
                if w.poll() is None:
                    print(f"distrnn.launch: worker pid {w.pid} still running {GRACE_SECONDS} s after another "
                          f"failed: killed", file=sys.stderr)
                    w.kill()
        time.sleep(0.2)
    return code or _failure(workers)


def _failure(workers: List[subprocess.Popen]) -> int:
    """The exit code of the first worker (in order) that ended with one other than 0, as a shell reports it
    (killed by signal N: 128 + N); 0 when none has."""
    return next((exit_code(w) for w in workers if w.poll()), 0)


def exit_code(worker: subprocess.Popen) -> int:
    rc = worker.poll()
    return rc if rc >= 0 else 128 - rc


def forward_signals(workers: List[subprocess.Popen]) -> List[int]:
    """Ctrl-C, SIGTERM and SIGUSR1 to the launcher are passed to every worker, which stop together. Returns
    the list the signals received are noted in (a stop: no restart after it)."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)
    for sig in FORWARDED:
        signal.signal(sig, handler)
    return received


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m distrnn.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=number(int, minimum=1, maximum=1024), required=True,
                        help="workers to start on this machine")
    parser.add_argument("--engine", choices=("tensorflow", "horovod"), default="tensorflow",
                        help="tensorflow (default): TensorFlow's own collectives, each worker started with its "
                             "TF_CONFIG; horovod: Horovod over Gloo, this launcher serving its rendezvous as "
                             "horovodrun does (TensorFlow up to 2.18)")
    parser.add_argument("--port", type=number(int, minimum=1, maximum=65535), default=0,
                        help="tensorflow: the first worker's port; horovod: the rendezvous's (default: free ports)")
    parser.add_argument("--min_nproc", type=number(int, minimum=1, maximum=1024), default=None,
                        help="with --max_restarts: the fewest workers a restart may go on with (default --nproc)")
    parser.add_argument("--max_restarts", type=number(int, minimum=0, maximum=1000), default=0,
                        help="restarts after workers are lost, each with the workers left and --resume (default 0)")
    parser.add_argument("--no_python", action="store_true",
                        help="run the command as it is, not after python (torchrun's --no-python): a shell "
                             "script or another program that starts the job")
    parser.usage = ("python -m distrnn.launch --nproc N [--port P] -m distrnn.ptb FLAGS... (or -- SCRIPT ARGS...; "
                    "--no_python -- PROGRAM ARGS...)")
    return parser


def split_command(argv: List[str]):
    """(the launcher's own flags, what each worker runs after python): the command starts at the first -m,
    or after a `--`."""
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[:i], argv[i:]
        if arg == "--":
            return argv[:i], argv[i + 1:]
    return argv, []


def run(argv) -> int:
    own, command = split_command(list(argv))
    args = build_parser().parse_args(own)
    if not command:
        raise UsageError("give the command each worker runs after python, e.g. -m distrnn.ptb --config small")
    min_nproc = args.nproc if args.min_nproc is None else args.min_nproc
    if min_nproc > args.nproc:
        raise UsageError(f"--min_nproc {min_nproc} is more than --nproc {args.nproc}: give at most {args.nproc}")
    workers = []
    received = forward_signals(workers)
    program = command if args.no_python else [sys.executable, *command]
    nproc, restarts = args.nproc, 0
    while True:
        workers.clear()
        end = start_workers(workers, program if restarts == 0 else with_resume(program), nproc, args.engine,
                            args.port)
        try:
            code = wait(workers)
        finally:
            end()
        codes = [exit_code(w) for w in workers]
        if code == 0 or received or LOST not in codes or not args.max_restarts:
            return code  # done, stopped, failed in a way a restart would repeat, or not elastic
        nproc = restart_size(codes, global_batch_in(program), min_nproc)
        restarts += 1
        if nproc is None or restarts > args.max_restarts:
            why = (f"no restarts left (--max_restarts {args.max_restarts})" if nproc is not None else
                   f"fewer than --min_nproc {min_nproc} workers to go on with")
            print(f"distrnn.launch: {lost_text(codes)}; {why}: stopped, the checkpoints intact (start again with "
                  f"--resume)", file=sys.stderr)
            return LOST
        print(f"distrnn.launch: {lost_text(codes)}; {nproc} worker(s) go on from the last checkpoint (restart "
              f"{restarts} of {args.max_restarts})", file=sys.stderr, flush=True)


def restart_size(codes: List[int], batch: Optional[int], min_nproc: int) -> Optional[int]:
    """How many workers go on after a loss: those that ended having lost the others (exit 75), fewer where
    the global batch would not split evenly over them; None below min_nproc."""
    size = most_workers(batch, codes.count(LOST))
    return size if size >= min_nproc else None


def lost_text(codes: List[int]) -> str:
    lost = [f"worker {i} ({describe_code(c)})" for i, c in enumerate(codes) if c != LOST]
    return f"lost {', '.join(lost) if lost else 'contact between the workers'}"


def describe_code(code: int) -> str:
    try:
        return f"ended by {signal.Signals(code - 128).name}" if code > 128 else f"exit {code}"
    except ValueError:  # above 128, yet no signal's number
        return f"exit {code}"


def with_resume(program: List[str]) -> List[str]:
    return program if "--resume" in program else [*program, "--resume"]


def main(argv=None) -> int:
    return cli.run_main("distrnn.launch", lambda: run(sys.argv[1:] if argv is None else argv))
