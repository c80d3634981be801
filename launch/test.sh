#!/usr/bin/env bash
# Runs the test suite on the two stacks distrnn supports, setting each up first when needed (launch/setup.sh):
#   1. the Horovod stack (.venv: TensorFlow 2.15.1, Keras 2, Horovod 0.28.1): every test, tests/test_stacks.py
#      included, which moves checkpoints between this stack and the second;
#   2. the newest TensorFlow (.venv-tf2.21.0: Keras 3, numpy 2, on Python 3.13 where there is one): the tests
#      whose outcome can differ by stack (STACK_TESTS: TensorFlow's kernels, tracing, checkpoints, SavedModel,
#      allocator, logging, optimizers and what the jobs print), leaving out those marked slow (end-to-end runs
#      of several processes, whose TensorFlow-facing part is the same job code these run) and the
#      TensorFlow-free ones (flags, config, processor, reader, layout, the launchers' plumbing), so that both
#      stacks fit in CI's time. It runs beside stack 1 (two pytest sessions, each with its own temporary
#      directory). DISTRNN_STACK2=all runs the whole suite there too, as do pytest arguments (what they
#      name, on both stacks). Stack 1's launcher tests (Horovod, Slurm, TensorFlow's engine) run as a third
#      session beside the others.
# Both stacks' results are printed; the exit code is the first failure's.
#   bash launch/test.sh [pytest args]
#   bash launch/test.sh --quick [pytest args]   # a developer's inner loop: leaves out the tests marked slow
#                                              # (end-to-end runs, Horovod, Slurm); CI runs everything
#   DISTRNN_STACKS=1 bash launch/test.sh        # the Horovod stack only
# The Slurm tests start a real cluster (tests/slurm_cluster.py) and need Debian's slurmctld, slurmd,
# slurm-client and munge: installed here when missing and this runs as root with apt-get; without
# them those tests skip and say why.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
newest_tf=2.21.0
newest_venv="$root/.venv-tf$newest_tf"
stacks=${DISTRNN_STACKS:-2}
bash "$root/launch/setup.sh"
if [[ "$stacks" == 2 ]]; then
    DISTRNN_TF=$newest_tf PYTHON="python3.13 python3.12 python3" bash "$root/launch/setup.sh"
    export DISTRNN_OTHER_PYTHON="$newest_venv/bin/python"
fi
if ! command -v slurmctld >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[test] installing slurmctld slurmd slurm-client munge for the Slurm tests"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             slurmctld slurmd slurm-client munge >/dev/null; }; then
        echo "[test] could not install Slurm; the Slurm tests will skip"
    fi
fi
quick=()
if [[ "${1:-}" == "--quick" ]]; then
    shift
    quick=(-m "not slow")
fi
cd "$root"
STACK_TESTS=(tests/test_compat.py tests/test_adam.py tests/test_rnn.py tests/test_ops.py tests/test_placement.py
             tests/test_train.py tests/test_best.py tests/test_use.py tests/test_mnist.py tests/test_memory.py
             tests/test_devices.py tests/test_cli.py tests/test_hostile.py tests/test_precision.py
             tests/test_collective.py)
# Each stack has a temporary directory of its own: two pytest sessions at once never share one.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/distrnn-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
rc=0
second_pid=
if [[ "$stacks" == 2 ]]; then
    if [[ "${DISTRNN_STACK2:-}" == all || $# -gt 0 ]]; then  # everything, or what the arguments name
        second=(--ignore=tests/test_horovod.py --ignore=tests/test_slurm.py --ignore=tests/test_stacks.py "${quick[@]}"
                "$@")
    else
        second=(-m "not slow" "${STACK_TESTS[@]}")
    fi
    # Beside stack 1, whose launcher tests spend much of their time waiting on processes and Slurm:
    # measured on 2 cores, both stacks together took 21 min, one after the other 30. Started with `&`,
    # the session inherits SIGINT ignored (what a script's shell does to its background commands):
    # tests/conftest.py gives it back its default, for the tests that send SIGINT.
    echo "[test] stack 2: $("$newest_venv/bin/python" -m distrnn.devices --stack) (beside stack 1; its report follows)"
    "$newest_venv/bin/python" -m pytest -ra --durations=25 --basetemp="$tmp/stack2" "${second[@]}" \
        > "$tmp/stack2.log" 2>&1 &
    second_pid=$!
fi
echo "[test] stack 1: $(.venv/bin/python -m distrnn.devices --stack)"
first=("${quick[@]}" "$@")
launchers_pid=
if [[ $# -eq 0 ]]; then
    # Stack 1's launcher tests (horovodrun; both engines side by side; a Slurm cluster; TensorFlow's engine) spend
    # most of their time waiting on the processes they start: a session of their own, beside the rest of
    # stack 1 (and stack 2), its report printed after.
    launchers=(tests/test_horovod.py tests/test_engines.py tests/test_slurm.py tests/test_collective.py tests/test_elastic.py)
    first=("${quick[@]}" "${launchers[@]/#/--ignore=}")
    .venv/bin/python -m pytest -ra --durations=5 --basetemp="$tmp/stack1-launchers" "${quick[@]}" "${launchers[@]}" \
        > "$tmp/launchers.log" 2>&1 &
    launchers_pid=$!
fi
.venv/bin/python -m pytest -ra --durations=25 --basetemp="$tmp/stack1" "${first[@]}" || rc=$?
if [[ -n "$launchers_pid" ]]; then
    r=0
    wait "$launchers_pid" || r=$?
    echo "[test] stack 1, the launcher tests (beside the rest):"
    cat "$tmp/launchers.log"
    [[ $rc != 0 ]] || rc=$r
fi
if [[ -n "$second_pid" ]]; then
    r=0
    wait "$second_pid" || r=$?
    echo "[test] stack 2: $("$newest_venv/bin/python" -m distrnn.devices --stack)"
    cat "$tmp/stack2.log"
    [[ $rc != 0 ]] || rc=$r
fi
exit "$rc"
