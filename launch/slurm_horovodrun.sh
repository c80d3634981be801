#!/usr/bin/env bash
# Inside a Slurm allocation (sbatch or salloc), started by horovodrun instead of srun:
#   salloc -N 2 --ntasks-per-node=4 --gpus-per-node=4
#   bash launch/slurm_horovodrun.sh -m distrnn.ptb --config large
# One process per Slurm task, on the allocation's nodes: the host list comes from
# SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE (python -m distrnn.slurm hosts: gpu[01-02] with
# 4(x2) -> gpu01:4,gpu02:4). horovodrun reaches the other nodes over ssh (or MPI, where Horovod has
# it); where ssh between nodes is not allowed, use srun, which needs neither:
#   srun python -m distrnn.ptb --config large        (see slurm/ptb_large.sh)
set -euo pipefail
DISTRNN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$DISTRNN_ROOT/launch/env.sh"
hosts=$("$PYTHON" -m distrnn.slurm hosts)
np=$("$PYTHON" -m distrnn.slurm np)
echo "[slurm_horovodrun] $np processes on $hosts" >&2
exec "$HOROVODRUN" -np "$np" -H "$hosts" "$PYTHON" "$@"
