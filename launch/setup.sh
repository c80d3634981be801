#!/usr/bin/env bash
# Creates (or brings up to date) the project's environment in .venv/:
# TensorFlow 2.15.1, Horovod 0.28.1 compiled against it, and distrnn installed
# editable with its dev tools. Idempotent: a second run only checks and takes
# seconds.
#
#   bash launch/setup.sh                 # tensorflow-cpu
#   DISTRNN_GPU=1 bash launch/setup.sh   # tensorflow[and-cuda], Horovod with NCCL
#
# Environment: PYTHON (interpreter for the venv, default python3),
# DISTRNN_WHEEL_CACHE (where built Horovod wheels are kept, default
# ~/.cache/distrnn/wheels).
#
# Why these versions: Horovod 0.28.1 (the last release) does not compile
# against TensorFlow >= 2.16 (measured with 2.21); TensorFlow 2.15.1 is the
# newest release it builds with.
set -euo pipefail

TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
py="$venv/bin/python"
gpu=${DISTRNN_GPU:-0}

log() { printf '[setup] %s\n' "$*"; }

if [[ ! -x "$py" ]]; then
    log "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$py" -m pip install -q --upgrade "pip>=23" "setuptools>=61,<70" wheel
fi
pip() { "$py" -m pip "$@"; }

installed() {  # installed NAME -> its version, or nothing
    "$py" - "$1" <<'PY'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PY
}

# --- TensorFlow ---------------------------------------------------------------
if [[ "$gpu" == 1 ]]; then tf_dist=tensorflow; tf_req="tensorflow[and-cuda]==$TF_VERSION"
else tf_dist=tensorflow-cpu; tf_req="tensorflow-cpu==$TF_VERSION"; fi
if [[ "$(installed "$tf_dist")" != "$TF_VERSION" ]]; then
    log "installing $tf_req"
    pip install -q "$tf_req"
else
    log "$tf_dist $TF_VERSION present"
fi

# --- Horovod ------------------------------------------------------------------
# Horovod compiles against the TensorFlow in the venv (no build isolation).
# Built wheels are kept in a cache keyed by everything the build depends on,
# so a fresh clone on a machine that built it once installs in seconds. (pip's
# own wheel cache is keyed by the sdist alone and would hand a CPU-only build
# to a GPU environment.)
with_mpi=0
if command -v mpicxx >/dev/null 2>&1 || command -v mpicc >/dev/null 2>&1; then with_mpi=1; fi
pyver=$("$py" -c 'import sys; print("%d%d" % sys.version_info[:2])')
key="hvd${HOROVOD_VERSION}-${tf_dist}${TF_VERSION}-py${pyver}-mpi${with_mpi}-gpu${gpu}-$(uname -m)"
cache="${DISTRNN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distrnn/wheels}/$key"

if [[ "$(installed horovod)" == "$HOROVOD_VERSION" ]]; then
    log "horovod $HOROVOD_VERSION present"
else
    if ! compgen -G "$cache/horovod-*.whl" >/dev/null; then
        command -v cmake >/dev/null || { echo "setup: cmake is needed to build Horovod: apt-get install cmake" >&2; exit 2; }
        command -v g++ >/dev/null || { echo "setup: a C++ compiler is needed to build Horovod: apt-get install g++" >&2; exit 2; }
        log "building horovod $HOROVOD_VERSION against $tf_dist $TF_VERSION (a few minutes, once per machine)"
        mkdir -p "$cache"
        # The system cmake is used on purpose: pip's cmake 4.x rejects the
        # cmake_minimum_required of Horovod's bundled gloo.
        export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
        if [[ "$with_mpi" == 1 ]]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
        if [[ "$gpu" == 1 ]]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
        export MAKEFLAGS="-j$(nproc)"
        pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$cache.tmp" "horovod==$HOROVOD_VERSION"
        mv "$cache.tmp"/horovod-*.whl "$cache"/ && rmdir "$cache.tmp"
    else
        log "installing horovod from cached wheel $cache"
    fi
    pip install -q --force-reinstall "$cache"/horovod-*.whl
fi

# --- distrnn ------------------------------------------------------------------
# Reinstalled when a dependency is missing (one added to pyproject.toml since the last setup).
if [[ -z "$(installed distrnn)" ]] || ! "$py" -c 'import pytest, pytest_timeout, psutil, pynvml, matplotlib' 2>/dev/null; then
    log "installing distrnn (editable) with dev tools"
    pip install -q -e "$root[dev]"
else
    log "distrnn present (editable)"
fi

# --- check ----------------------------------------------------------------------
build=$(TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/horovodrun" --check-build 2>/dev/null)
for need in TensorFlow Gloo; do
    if ! grep -q "\[X\] $need" <<<"$build"; then
        echo "$build" >&2
        echo "setup: horovodrun --check-build does not list $need; remove $cache and .venv and run again" >&2
        exit 1
    fi
done
log "ready: $(TF_CPP_MIN_LOG_LEVEL=3 "$py" -c 'import tensorflow as tf, horovod; print("tensorflow", tf.__version__, "horovod", horovod.__version__)' 2>/dev/null)"
