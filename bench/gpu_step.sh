#!/usr/bin/env bash
# Issue 17, item 5: one training step of the ViT-S/14 and ViT-B/14 DINOv2 recipes on one GPU in bf16,
# plain and under FSDP2 in a one-rank process group, beside a bare timm ViT forward+backward and
# lightly's DINO example step on the same backbone and crops, in one run per recipe. Prints images/s,
# MFU against this GPU's measured bf16 matmul peak and the peak GPU memory of each step
# (bench/train_step.py --recipe ...).
#
# The GPU machine has torch and timm but reaches no package registry. Fetch the pure-Python wheels
# it lacks here once (into .whl/, which git ignores via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       omegaconf==2.3.0 hydra-core==1.3.8 lightly==1.6.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# then run `bash bench/gpu_step.sh` there with .whl carried; tables land in $OUT (default gpu_step_out/).
# STEPS (timed steps in each of the 5 rounds, default 4) and PYTHON (default python3) can be set in
# the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_step_out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/medssl-site .whl/*.whl
  export PYTHONPATH="/tmp/medssl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
} | tee "$OUT/machine.txt"
for recipe in dinov2_vits14 dinov2_vitb14; do
  "$PYTHON" bench/train_step.py --recipe "$recipe" --precisions bf16 --steps "${STEPS:-4}" \
    --warmup 3 --workloads dinov2,dinov2_fsdp,timm,lightly "$@" 2>&1 | tee "$OUT/$recipe.txt"
done
