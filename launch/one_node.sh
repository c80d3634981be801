#!/usr/bin/env bash
# One node, N processes (one per GPU), started by horovodrun:
#   bash launch/one_node.sh N PYTHON_ARGS...
#   bash launch/one_node.sh 4 -m distrnn.ptb --config large
#   bash launch/one_node.sh 2 -m distrnn.ptb --config small --virtual_devices 1   # a machine without GPUs
# Runs: horovodrun -np N -H localhost:N python PYTHON_ARGS (Python from launch/env.sh).
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: bash launch/one_node.sh N PYTHON_ARGS... (e.g. 4 -m distrnn.ptb --config large)" >&2; exit 2
fi
DISTRNN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$DISTRNN_ROOT/launch/env.sh"
n=$1; shift
exec "$HOROVODRUN" -np "$n" -H "localhost:$n" "$PYTHON" "$@"
