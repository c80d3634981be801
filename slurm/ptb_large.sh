#!/bin/bash
# PTB word language model, large preset (Zaremba et al. 2014: 2 x 1500-unit LSTM, 35 steps,
# keep_prob 0.35, 55 epochs, 66M parameters), data parallel: one task per GPU.
#
#   sbatch slurm/ptb_large.sh [distrnn.ptb flags]             # from the distrnn checkout
#   sbatch slurm/ptb_large.sh --max_steps 20 --data_path /data/ptb
#   # no GPUs, 2-core nodes: clear the GPU request, fit tasks x cores to the node, allow the CPU time
#   sbatch --gres=none --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --time=7-0 slurm/ptb_large.sh
#
# Hardware: one node with 4 GPUs of 16 GB or more (the model needs 1.3 GB a GPU at batch 20:
# python -m distrnn.devices --plan --config large --num_gpus 4), 8 cores per GPU. A request the
# node cannot meet (8 cores a task on a 2-core node) leaves the job pending for good
# (Reason=PartitionConfig); requests overridden on the command line are named in the job's log.
# Expected: test perplexity about 78 after 55 epochs (TensorFlow's tutorial: valid 82.62, test
# 78.29; the paper: 82.2 / 78.4): the global batch stays at the paper's 20 rows
# (--global_batch_size 20, 5 rows a GPU), so the 4 tasks train exactly what one process does.
# Time: the paper reports a day on one NVIDIA K20 (about 26 minutes an epoch); no GPU was
# available to measure one here. On 2 CPU cores (processor not recorded), 2 tasks trained 521
# words/sec (ptb-mini's vocabulary of 6,049 words; bash launch/one_node.sh 2 -m distrnn.ptb
# --config large --global_batch_size 20 --max_steps 40): 30 minutes a 929k-word epoch.
# For throughput instead of the paper's batch: --global_batch_size 80 (20 rows a GPU) and see
# README: --lr_scaling.
#
# Resumable: Slurm sends SIGUSR1 five minutes before the time limit; every task saves a checkpoint
# and exits 138, and the job requeues itself. A requeued or preempted job (SIGTERM: checkpoint, exit
# 143) keeps its id and continues from runs/ptb_large-JOBID. Logs: logs/ptb_large-JOBID.out.
#SBATCH --job-name=ptb_large
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=USR1@300
DISTRNN_ROOT=${DISTRNN_ROOT:-$SLURM_SUBMIT_DIR}
[[ -f $DISTRNN_ROOT/slurm/job.sh ]] || { echo "ptb_large.sh: submit from the distrnn checkout, or set DISTRNN_ROOT" >&2; exit 2; }
source "$DISTRNN_ROOT/slurm/job.sh"

distrnn_srun "$PYTHON" -m distrnn.ptb --config large --global_batch_size 20 \
     --save_path "$SAVE_PATH" --resume --metrics_json "$SAVE_PATH/metrics.json" "$@"
requeue_if_signalled $?
