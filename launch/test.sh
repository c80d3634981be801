#!/usr/bin/env bash
# Runs the test suite on the two stacks distrnn supports, setting each up first when needed (launch/setup.sh):
#   1. the Horovod stack (.venv: TensorFlow 2.15.1, Keras 2, Horovod 0.28.1): every test;
#   2. the newest TensorFlow (.venv-tf2.21.0: Keras 3, numpy 2, on Python 3.13 where there is one): every test
#      but the Horovod and Slurm launchers' (tests/test_horovod.py, tests/test_slurm.py), which need Horovod,
#      and tests/test_stacks.py, which stack 1 runs with both stacks' pythons.
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
echo "[test] stack 1: $(.venv/bin/python -m distrnn.devices --stack)"
rc=0
.venv/bin/python -m pytest -ra "${quick[@]}" "$@" || rc=$?
if [[ "$stacks" == 2 ]]; then
    echo "[test] stack 2: $("$newest_venv/bin/python" -m distrnn.devices --stack)"
    "$newest_venv/bin/python" -m pytest -ra "${quick[@]}" --ignore=tests/test_horovod.py --ignore=tests/test_slurm.py \
        --ignore=tests/test_stacks.py "$@" || { r=$?; [[ $rc != 0 ]] || rc=$r; }
fi
exit "$rc"
