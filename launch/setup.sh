#!/usr/bin/env bash
# Creates (or brings up to date) a distrnn environment: TensorFlow, Horovod compiled against it where
# Horovod builds, and distrnn installed editable with its dev tools. Idempotent: a second run only
# checks and takes seconds. Prints what it built on its last line.
#
#   bash launch/setup.sh                      # the Horovod stack: TensorFlow 2.15.1 + Horovod 0.28.1, in .venv/
#   DISTRNN_TF=2.21.0 PYTHON=python3.13 bash launch/setup.sh   # the newest TensorFlow, in .venv-tf2.21.0/
#   DISTRNN_GPU=1 bash launch/setup.sh        # tensorflow[and-cuda], Horovod with NCCL
#
# Environment:
#   DISTRNN_TF       TensorFlow version (default 2.15.1)
#   DISTRNN_HOROVOD  auto (default: built where it builds, TensorFlow <= 2.18), 1 (insist), 0 (none)
#   DISTRNN_VENV     where the environment goes (default .venv for 2.15.1, .venv-tfVERSION otherwise)
#   PYTHON           interpreter for the venv, or several in order of preference (default python3; a pyenv
#                    version's python3.X is found too)
#   DISTRNN_WHEEL_CACHE  where built Horovod wheels are kept (default ~/.cache/distrnn/wheels)
#
# Why these versions (measured, docs/stacks.md): Horovod 0.28.1, its last release, compiles and passes
# distrnn's Horovod tests against TensorFlow 2.15.1, 2.16.2, 2.17.1 and 2.18.1 and does not compile
# against 2.19.1, 2.20.0 or 2.21.0 (its XLA ops need headers those wheels no longer ship). 2.15.1 stays
# the default: the newest TensorFlow with Keras 2, and the one every figure in docs/ was measured on.
set -euo pipefail

TF_VERSION=${DISTRNN_TF:-2.15.1}
HOROVOD_VERSION=0.28.1
HOROVOD_TF_MAX=2.18  # the newest TensorFlow minor Horovod 0.28.1 builds against (measured)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "$TF_VERSION" == 2.15.1 ]]; then default_venv="$root/.venv"; else default_venv="$root/.venv-tf$TF_VERSION"; fi
venv=${DISTRNN_VENV:-$default_venv}
py="$venv/bin/python"
gpu=${DISTRNN_GPU:-0}
want_horovod=${DISTRNN_HOROVOD:-auto}

log() { printf '[setup] %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 2; }

[[ "$TF_VERSION" =~ ^2\.([0-9]+)\.[0-9]+$ ]] ||
    die "DISTRNN_TF=$TF_VERSION is not a TensorFlow release such as 2.15.1 or 2.21.0"
tf_minor=${BASH_REMATCH[1]}
(( tf_minor >= 15 )) || die "DISTRNN_TF=$TF_VERSION: distrnn needs TensorFlow 2.15.1 or newer"
[[ "$want_horovod" =~ ^(auto|0|1)$ ]] || die "DISTRNN_HOROVOD=$want_horovod: give auto, 1 or 0"
horovod_builds=0
(( tf_minor <= ${HOROVOD_TF_MAX#2.} )) && horovod_builds=1

find_python() {  # find_python NAME... -> the first that runs: NAME itself, or pyenv's python of that version
    local name ver candidate
    for name in "$@"; do
        if "$name" -c '' 2>/dev/null; then command -v "$name"; return; fi
        ver=${name#python}
        for candidate in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$ver"*/bin/"$name"; do
            [[ -x "$candidate" ]] && { echo "$candidate"; return; }
        done
    done
    die "no interpreter among: $*: set PYTHON to a python of a version TensorFlow $TF_VERSION supports"
}

if [[ ! -x "$py" ]]; then
    # shellcheck disable=SC2086  # PYTHON may list several, in order of preference
    python=$(find_python ${PYTHON:-python3})
    log "creating $venv with $("$python" -V 2>&1)"
    "$python" -m venv "$venv"
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

build_horovod() {  # the wheel into $cache, or return 1 with the build's output in $cache.log
    command -v cmake >/dev/null || die "cmake is needed to build Horovod: apt-get install cmake"
    command -v g++ >/dev/null || die "a C++ compiler is needed to build Horovod: apt-get install g++"
    log "building horovod $HOROVOD_VERSION against $tf_dist $TF_VERSION (a few minutes, once per machine)"
    mkdir -p "$cache"
    # The system cmake is used on purpose: pip's cmake 4.x rejects the
    # cmake_minimum_required of Horovod's bundled gloo.
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
    if [[ "$with_mpi" == 1 ]]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    if [[ "$gpu" == 1 ]]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
    export MAKEFLAGS="-j$(nproc)"
    pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$cache.tmp" "horovod==$HOROVOD_VERSION" \
        >"$cache.log" 2>&1 || { rm -rf "$cache.tmp"; return 1; }
    mv "$cache.tmp"/horovod-*.whl "$cache"/ && rmdir "$cache.tmp"
    built=1
}

if [[ "$want_horovod" == 0 ]] || [[ "$want_horovod" == auto && "$horovod_builds" == 0 ]]; then
    if [[ "$horovod_builds" == 0 ]]; then
        log "no Horovod: $HOROVOD_VERSION, its last release, does not build against TensorFlow $TF_VERSION" \
            "(it builds against <= $HOROVOD_TF_MAX); this stack runs every job as one process"
    else
        log "no Horovod (DISTRNN_HOROVOD=0)"
    fi
    if [[ -n "$(installed horovod)" ]]; then pip uninstall -q -y horovod; fi
elif [[ "$(installed horovod)" == "$HOROVOD_VERSION" ]]; then
    log "horovod $HOROVOD_VERSION present"
elif compgen -G "$cache/horovod-*.whl" >/dev/null || build_horovod; then
    [[ -n "${built:-}" ]] || log "installing horovod from cached wheel $cache"
    pip install -q --force-reinstall "$cache"/horovod-*.whl
else
    why=$(grep -m1 -E "fatal error|error:" "$cache.log" | sed 's/^ *//' | cut -c1-200)
    if [[ "$want_horovod" == 1 ]]; then
        die "Horovod $HOROVOD_VERSION did not build against TensorFlow $TF_VERSION: $why (log: $cache.log)"
    fi
    log "no Horovod: $HOROVOD_VERSION did not build against TensorFlow $TF_VERSION here ($why; log: $cache.log);" \
        "this stack runs every job as one process"
fi

# --- distrnn ------------------------------------------------------------------
# Reinstalled when a dependency is missing (one added to pyproject.toml since the last setup).
needs='import pytest, pytest_timeout, hypothesis, psutil, pynvml, matplotlib, tensorboard'
if [[ -z "$(installed distrnn)" ]] || ! "$py" -c "$needs" 2>/dev/null; then
    log "installing distrnn (editable) with dev tools"
    pip install -q -e "$root[dev]"
else
    log "distrnn present (editable)"
fi

# --- check ----------------------------------------------------------------------
if [[ -n "$(installed horovod)" ]]; then
    build=$(TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/horovodrun" --check-build 2>/dev/null)
    for need in TensorFlow Gloo; do
        if ! grep -q "\[X\] $need" <<<"$build"; then
            echo "$build" >&2
            echo "setup: horovodrun --check-build does not list $need; remove $cache and $venv and run again" >&2
            exit 1
        fi
    done
fi
log "ready: $venv: $("$py" -m distrnn.devices --stack 2>/dev/null)"
