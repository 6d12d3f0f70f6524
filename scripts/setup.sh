#!/usr/bin/env bash
# Set everything up from nothing, idempotently: Debian's Fashion-MNIST
# package, a virtual environment (.venv, or $SPARSESAM_VENV) with the pinned
# dependencies, and the compiled extension (rebuilt only when a source
# changed). Safe to run again; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SPARSESAM_VENV:-.venv}
export MAX_JOBS=${MAX_JOBS:-2}

# 1. The offline data set (Debian package), when missing.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: no apt-get; point --data-dir (or SPARSESAM_FASHION_MNIST) at the Fashion-MNIST IDX files" >&2
  fi
fi

# 2. The virtual environment and pinned dependencies.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# 3. The extension: rebuilt when no library exists or a source is newer.
lib=$(ls sparsesam/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$lib" ] || [ -n "$(find csrc setup.py pyproject.toml -newer "$lib" -type f | head -n 1)" ] \
   || ! "$VENV/bin/python" -c "import sparsesam" 2>/dev/null; then
  echo "setup: building sparsesam._C (MAX_JOBS=$MAX_JOBS)"
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  touch sparsesam/_C*.so
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, sparsesam; print("torch", torch.__version__, "sparsesam", sparsesam.__version__)'))"
