#!/usr/bin/env bash
# One batched GPU-machine session: install carried wheels, run the GPU tests, our benchmark and the peer's.
# Usage on the device machine (repo root, wheels + peer_sdv2.py in .whl/): bash bench/gpu_session.sh OUTDIR
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton, diffusers, transformers; print(torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels_block_sparse.py tests/test_attention_backends.py 2>&1 | tail -15
for attn in sdpa sdpa_cudnn; do
  timeout 200 python3 bench/bench_stream.py --attention $attn --chunks 8 --out "$out" 2>&1 | tail -6
done
[ -f .whl/peer_sdv2.py ] && timeout 200 python3 .whl/peer_sdv2.py --out "$out/peer_sdv2.jsonl" 2>&1 | tail -12
