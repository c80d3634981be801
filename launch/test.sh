#!/usr/bin/env bash
# Runs the whole test suite, setting up .venv/ first when needed.
#   bash launch/test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/launch/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest -ra "$@"
