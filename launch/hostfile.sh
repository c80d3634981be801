#!/usr/bin/env bash
# Several nodes listed in a host file, started by horovodrun over ssh:
#   bash launch/hostfile.sh HOSTFILE PYTHON_ARGS...
#   bash launch/hostfile.sh hosts.txt -m distrnn.ptb --config large
# HOSTFILE has one node a line, `NAME slots=GPUS` (`gpu01 slots=4`); one process per slot.
# Needs passwordless ssh from here to every node, and the checkout (with its .venv) at the same
# path on each. Runs: horovodrun -np SLOTS -H NAME:SLOTS,... python PYTHON_ARGS.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: bash launch/hostfile.sh HOSTFILE PYTHON_ARGS... (HOSTFILE: lines of 'NAME slots=N')" >&2; exit 2
fi
if [[ ! -f $1 || ! -r $1 ]]; then
    echo "hostfile.sh: error: cannot read the host file $1 (no such file, not a file, or unreadable): give a" \
         "text file of lines 'NAME slots=N'" >&2; exit 2
fi
DISTRNN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$DISTRNN_ROOT/launch/env.sh"
hostfile=$1; shift
# A line without slots= counts one; blank lines and # comments are skipped (horovodrun's own
# -hostfile reader fails on them), so the file is handed over as a -H list. A bad line is named.
parsed=$(awk '!/^[[:space:]]*(#|$)/ {
                  n = 1
                  for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7)
                  if (n !~ /^[0-9]+$/ || n + 0 < 1 || $1 !~ /^[A-Za-z0-9._-]+$/) {
                      printf "line %d: %s", NR, $0; bad = 1; exit
                  }
                  s += n; h = h (h ? "," : "") $1 ":" n
              }
              END { if (!bad) print s + 0, h }' "$hostfile" | tr -d '\000')
if [[ $parsed == line* ]]; then
    echo "hostfile.sh: error: $hostfile, ${parsed:0:200}: expected 'NAME slots=N' with N a positive whole" \
         "number (gpu01 slots=4)" >&2; exit 2
fi
read -r np hosts <<< "$parsed"
if [[ ${np:-0} -lt 1 ]]; then echo "hostfile.sh: error: $hostfile lists no node: add lines 'NAME slots=N'" >&2; exit 2; fi
exec "$HOROVODRUN" -np "$np" -H "$hosts" "$PYTHON" "$@"
