#!/usr/bin/env bash
# One node, N processes (one per GPU), joined by whichever engine the stack has:
#   bash launch/one_node.sh N PYTHON_ARGS...
#   bash launch/one_node.sh 4 -m distrnn.ptb --config large
#   bash launch/one_node.sh 2 -m distrnn.ptb --config small --virtual_devices 1   # a machine without GPUs
# Runs horovodrun -np N -H localhost:N python PYTHON_ARGS where Horovod loads (TensorFlow up to 2.18), else
# python -m distrnn.launch --nproc N PYTHON_ARGS (TensorFlow's own collectives, each process started with
# its TF_CONFIG). DISTRNN_ENGINE=tensorflow takes the second where both run (Python from launch/env.sh).
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash launch/one_node.sh N PYTHON_ARGS... (e.g. 4 -m distrnn.ptb --config large)" >&2; exit 2
fi
DISTRNN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$DISTRNN_ROOT/launch/env.sh"
n=$1; shift
if [[ ${DISTRNN_ENGINE:-auto} != tensorflow ]] && command -v "$HOROVODRUN" >/dev/null \
        && "$PYTHON" -c "import horovod.tensorflow" 2>/dev/null; then
    exec "$HOROVODRUN" -np "$n" -H "localhost:$n" "$PYTHON" "$@"
fi
exec "$PYTHON" -m distrnn.launch --nproc "$n" "$@"
