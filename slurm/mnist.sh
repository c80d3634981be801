#!/bin/bash
# Row-by-row image classifier, stacked preset (3 LSTM layers of 128 units, Adam 0.001, batch 128,
# 10 epochs): one task, each layer on its own GPU (model parallelism, pipelined).
#
#   sbatch slurm/mnist.sh --data_path /data/fashion-mnist      # from the distrnn checkout
#   sbatch slurm/mnist.sh --config lstm --dataset fashion_mnist # another preset; another data set
#   sbatch --ntasks-per-node=2 --gpus-per-node=6 slurm/mnist.sh --gpus_per_rank 3   # 2 ranks x 3 GPUs
#   sbatch --gres=none --gpus-per-node=0 --cpus-per-task=2 slurm/mnist.sh --virtual_devices 3  # no GPUs, 2 cores
#
# Without --data_path it reads ~/.cache/distrnn/mnist, downloading it first; compute nodes without
# internet need the four IDX files there or --data_path. Hardware: 3 GPUs (a few hundred MB each),
# 4 cores. Expected and measured figures: README, Measured (python -m distrnn.mnist --list_configs).
#
# Resumable as slurm/ptb_large.sh: SIGUSR1 five minutes before the time limit saves a checkpoint
# and requeues the job; a requeued or preempted job continues from runs/mnist-JOBID.
#SBATCH --job-name=mnist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=3
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=USR1@300
DISTRNN_ROOT=${DISTRNN_ROOT:-$SLURM_SUBMIT_DIR}
[[ -f $DISTRNN_ROOT/slurm/job.sh ]] || { echo "mnist.sh: submit from the distrnn checkout, or set DISTRNN_ROOT" >&2; exit 2; }
source "$DISTRNN_ROOT/slurm/job.sh"

distrnn_srun "$PYTHON" -m distrnn.mnist --config stacked --placement pipeline \
     --save_path "$SAVE_PATH" --resume --metrics_json "$SAVE_PATH/metrics.json" "$@"
requeue_if_signalled $?
