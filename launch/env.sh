# Sourced by the launch/ and slurm/ scripts: which Python and horovodrun a job runs with.
#   PYTHON      DISTRNN_PYTHON, else the checkout's .venv/bin/python (bash launch/setup.sh), else python3
#   HOROVODRUN  the horovodrun beside $PYTHON, else the one on PATH
# Expects DISTRNN_ROOT, the checkout.
if [[ -n "${DISTRNN_PYTHON:-}" ]]; then PYTHON=$DISTRNN_PYTHON
elif [[ -x "$DISTRNN_ROOT/.venv/bin/python" ]]; then PYTHON=$DISTRNN_ROOT/.venv/bin/python
else PYTHON=$(command -v python3); fi
HOROVODRUN=$(dirname "$PYTHON")/horovodrun
[[ -x $HOROVODRUN ]] || HOROVODRUN=$(command -v horovodrun || echo horovodrun)
