# Sourced by the sbatch scripts in slurm/ (not run alone), with DISTRNN_ROOT the checkout. Sets:
#   PYTHON     see launch/env.sh
#   SAVE_PATH  the job's own directory for checkpoints, TensorBoard and metrics:
#              ${DISTRNN_SAVE_ROOT:-runs}/JOBNAME-JOBID (relative to the submit directory); a
#              requeued or preempted job keeps its id, so it resumes from there
# logs what the allocation got otherwise than the script's #SBATCH header asked (`distrnn.slurm
# header`), and defines requeue_if_signalled RC, for after the srun line: a job stopped by the signal Slurm
# sends ahead of its time limit (--signal=USR1@...; every task saved a checkpoint and exited 138)
# is put back in the queue, to continue from that checkpoint; and distrnn_srun COMMAND..., which runs
# the job's step on the allocation's nodes and, when a node is lost, again on the nodes left.
set -uo pipefail

source "$DISTRNN_ROOT/launch/env.sh"
SAVE_PATH=${DISTRNN_SAVE_ROOT:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$SAVE_PATH"
export PYTHONUNBUFFERED=1  # progress lines reach the log as they happen

echo "[slurm] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS:-1} task(s), $("$PYTHON" -m distrnn.slurm hosts 2>/dev/null || echo '?'); save path ${SAVE_PATH}"
# Requests overridden on the sbatch command line (a CPU cluster, another node size): said once a start.
"$PYTHON" -m distrnn.slurm header "$0" --time_limit "$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null)" 2>/dev/null

requeue_if_signalled() {
    local rc=$1
    if [[ $rc == 138 ]]; then
        echo "[slurm] stopped ahead of the time limit with a checkpoint; requeueing job ${SLURM_JOB_ID} to continue"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}

# srun COMMAND on the allocation's live nodes: as many tasks a node as the allocation has, fewer where the
# command's global batch would not split evenly over them (python -m distrnn.slurm tasks). When the step
# ends having lost a node (the scripts ask --no-kill, so Slurm keeps the allocation and drops the node) or a
# rank (exit 75), it runs again on the nodes left, --resume continuing from the last checkpoint, up to
# DISTRNN_MAX_RESTARTS times (3 by default, torchrun's --max-restarts); a requeue would wait in the queue
# and, measured on Slurm 22.05, ask for the first allocation's task count again. Returns the exit code.
distrnn_srun() {
    local max=${DISTRNN_MAX_RESTARTS:-3} restarts=0 nodes names tasks rc left
    [[ $max =~ ^[0-9]+$ ]] || { echo "[slurm] DISTRNN_MAX_RESTARTS=$max is not a count: give 0 or more" >&2; return 2; }
    read -r nodes names < <(squeue -h -j "$SLURM_JOB_ID" -o "%D %N")
    while true; do
        tasks=$("$PYTHON" -m distrnn.slurm tasks "$nodes" "$@") || return 2
        srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks="$tasks" --nodelist="$names" "$@"
        rc=$?
        read -r left names < <(squeue -h -j "$SLURM_JOB_ID" -o "%D %N")
        if (( rc == 0 || rc == 138 || rc == 143 )) || (( rc != 75 && left == nodes )); then
            return "$rc"  # done, stopped by a signal, or failed in a way a restart would repeat
        fi
        if (( restarts >= max )); then
            echo "[slurm] the step ended with exit $rc on $left of $nodes node(s); no restarts left" \
                 "(DISTRNN_MAX_RESTARTS=$max): stopped, the checkpoints intact (resubmit to go on)"
            return "$rc"
        fi
        restarts=$((restarts + 1))
        echo "[slurm] the step ended with exit $rc, $((nodes - left)) node(s) lost; going on on $names from the" \
             "last checkpoint (restart $restarts of $max)"
        nodes=$left
    done
}
