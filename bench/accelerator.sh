#!/usr/bin/env bash
# The accelerator benchmark (bench/bench_accelerator.py: its docstring says what each row
# measures): the device, then ConvNeXt-B DeepSSIM forward and Siamese train step in float32
# and bfloat16, the LDM UNet train step and DDIM sampling, the torch anchors of both where
# torch with CUDA is present, embedding throughput and all-pairs SSIM. Under 10 minutes on
# one GPU; writes bench/ACCELERATOR.md (--out).
#
#   bash bench/accelerator.sh                                   # full sizes, on a GPU
#   bash bench/accelerator.sh --out /tmp/acc.md --sections embedder,ldm
#   bash bench/accelerator.sh --allow-cpu --quick --out /tmp/acc_smoke.md   # CPU smoke run
#
# Without an accelerator it stops with an error unless --allow-cpu. PYTHON picks the
# interpreter (default: python on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# JAX grows device memory on demand instead of taking 75% at start: the torch anchors run
# in another process on the same device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "${PYTHON:-python}" "$here/bench_accelerator.py" "$@"
