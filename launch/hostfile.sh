#!/usr/bin/env bash
# Several nodes listed in a host file, started by horovodrun over ssh:
#   bash launch/hostfile.sh HOSTFILE PYTHON_ARGS...
#   bash launch/hostfile.sh hosts.txt -m distrnn.ptb --config large
# HOSTFILE has one node a line, `NAME slots=GPUS` (`gpu01 slots=4`); one process per slot.
# Needs passwordless ssh from here to every node, and the checkout (with its .venv) at the same
# path on each. Runs: horovodrun -np SLOTS -H NAME:SLOTS,... python PYTHON_ARGS.
set -euo pipefail
if [[ $# -lt 2 || ! -f $1 ]]; then
    echo "usage: bash launch/hostfile.sh HOSTFILE PYTHON_ARGS... (HOSTFILE: lines of 'NAME slots=N')" >&2; exit 2
fi
DISTRNN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$DISTRNN_ROOT/launch/env.sh"
hostfile=$1; shift
# A line without slots= counts one; blank lines and # comments are skipped (horovodrun's own
# -hostfile reader fails on them), so the file is handed over as a -H list.
read -r np hosts < <(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7)
                                                s += n; h = h (h ? "," : "") $1 ":" n }
                         END { print s + 0, h }' "$hostfile")
if [[ $np -lt 1 ]]; then echo "hostfile.sh: $hostfile lists no node" >&2; exit 2; fi
exec "$HOROVODRUN" -np "$np" -H "$hosts" "$PYTHON" "$@"
