#!/usr/bin/env bash
# Runs the whole test suite, setting up .venv/ first when needed.
#   bash launch/test.sh [pytest args]
#   bash launch/test.sh --quick [pytest args]   # a developer's inner loop: leaves out the tests marked slow
#                                              # (end-to-end runs, Horovod, Slurm); CI runs everything
# The Slurm tests start a real cluster (tests/slurm_cluster.py) and need Debian's slurmctld, slurmd,
# slurm-client and munge: installed here when missing and this runs as root with apt-get; without
# them those tests skip and say why.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
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
exec .venv/bin/python -m pytest -ra "${quick[@]}" "$@"
