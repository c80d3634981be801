#!/usr/bin/env bash
# Sets up on first use, then trains the PTB small preset for one epoch and
# prints valid/test perplexity and words/sec.
#   bash launch/quickstart.sh [--data_path DIR] [more distrnn.ptb flags]
# Without --data_path the standard PTB is downloaded to ~/.cache/distrnn/ptb.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
exec .venv/bin/python -m distrnn.ptb --config small --max_epochs 1 "$@"
