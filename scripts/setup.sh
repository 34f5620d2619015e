#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian/Ubuntu machine (run as root,
# or with sudo available): OS packages (the real Fashion-MNIST files), then the
# package itself with its test extras into the current Python environment.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    echo "[setup] installing OS packages (dataset-fashion-mnist)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] no apt-get: Fashion-MNIST will be downloaded by torchvision on first use" >&2
  fi
fi

PY="${PYTHON:-python3}"
# torch/torchvision are pinned (they install from this machine's disk); install them
# first so that no other requirement pulls a different build.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,baselines,thundersvm,gradient]"
echo "[setup] done: $("$PY" -c 'import torch, ray, faiss; print("torch", torch.__version__, "ray", ray.__version__, "faiss", faiss.__version__)')"
