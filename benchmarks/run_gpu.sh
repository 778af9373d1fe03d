#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, one after the other (never two at once), on a machine with an
# NVIDIA GPU and this package installed: STU-Net-B, 112 x 112 x 128, batch 4; SparK against AnatoMask,
# masked dense against spconv, fp32 and bf16; the step with a bf16 teacher; the encoder backends by mask
# ratio for both rules of `backend: auto` (training, and the teacher's forward); the profile.
# Usage: bash benchmarks/run_gpu.sh [RESULTS_DIR]   (about 10 minutes on one recent GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python benchmarks/pretrain_step.py --size B --batch 4 --repeats 5 --warmup 2 \
    --backends dense spconv --out "$out/pretrain_step_B_gpu_fp32.json"
python benchmarks/pretrain_step.py --size B --batch 4 --repeats 5 --warmup 2 \
    --backends dense --precision bf16 --out "$out/pretrain_step_B_gpu_bf16.json"
python benchmarks/pretrain_step.py --size B --batch 4 --repeats 5 --warmup 2 \
    --backends dense --teacher-precision bf16 --out "$out/pretrain_step_B_gpu_bf16_teacher.json"
python benchmarks/encoder_backends.py --size B --batch 4 --repeats 5 --warmup 2 \
    --out "$out/encoder_backends_B_gpu.json"
python benchmarks/encoder_backends.py --size B --batch 4 --repeats 5 --warmup 2 --ratios 0.6 0.75 0.8 0.9 \
    --forward-only --out "$out/encoder_backends_B_gpu_forward.json"
python benchmarks/profile_step.py --size B --batch 4 --out "$out/profile_step_B_gpu.json"
