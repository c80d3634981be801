#!/bin/bash
# PTB word language model, small preset (Zaremba et al. 2014: 2 x 200-unit LSTM, 20 steps, no
# dropout, 13 epochs, 4.6M parameters), on one GPU.
#
#   sbatch slurm/ptb_small.sh [distrnn.ptb flags]             # from the distrnn checkout
#   # no GPUs, 2-core nodes: clear the GPU request, fit the cores to the node, allow the CPU time
#   sbatch --gres=none --gpus-per-node=0 --cpus-per-task=2 --time=3:00:00 slurm/ptb_small.sh
#
# Hardware: one GPU (the model needs well under 1 GB), 4 cores. Expected: test perplexity about
# 116 after 13 epochs (TensorFlow's tutorial reports valid 121.39, test 115.91). Time: no GPU was
# available to measure one; on 2 CPU cores distrnn trained 18,700 words/sec (ptb-mini's vocabulary
# of 6,049 words; README: Measured; the processor was not recorded), 50 s a 929k-word epoch, 11
# minutes in all.
#
# Resumable as slurm/ptb_large.sh: SIGUSR1 five minutes before the time limit saves a checkpoint
# and requeues the job; a requeued or preempted job continues from runs/ptb_small-JOBID.
#SBATCH --job-name=ptb_small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=USR1@300
DISTRNN_ROOT=${DISTRNN_ROOT:-$SLURM_SUBMIT_DIR}
[[ -f $DISTRNN_ROOT/slurm/job.sh ]] || { echo "ptb_small.sh: submit from the distrnn checkout, or set DISTRNN_ROOT" >&2; exit 2; }
source "$DISTRNN_ROOT/slurm/job.sh"

distrnn_srun "$PYTHON" -m distrnn.ptb --config small \
     --save_path "$SAVE_PATH" --resume --metrics_json "$SAVE_PATH/metrics.json" "$@"
requeue_if_signalled $?
