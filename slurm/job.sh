# Sourced by the sbatch scripts in slurm/ (not run alone), with DISTRNN_ROOT the checkout. Sets:
#   PYTHON     see launch/env.sh
#   SAVE_PATH  the job's own directory for checkpoints, TensorBoard and metrics:
#              ${DISTRNN_SAVE_ROOT:-runs}/JOBNAME-JOBID (relative to the submit directory); a
#              requeued or preempted job keeps its id, so it resumes from there
# logs what the allocation got otherwise than the script's #SBATCH header asked (`distrnn.slurm
# header`), and defines requeue_if_signalled RC, for after the srun line: a job stopped by the signal Slurm
# sends ahead of its time limit (--signal=USR1@...; every task saved a checkpoint and exited 138)
# is put back in the queue, to continue from that checkpoint.
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
