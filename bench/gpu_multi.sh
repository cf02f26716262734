#!/usr/bin/env bash
# Multi-GPU session (issue #7): one stream over N pipeline stages, one GPU each, NCCL.
# Usage on the device machine (repo root, wheels in .whl/):
#   bash bench/gpu_multi.sh OUTDIR
#   1. installs the carried wheels and this repo (as gpu_session.sh does)
#   2. prints torch / CUDA / NCCL versions, the GPUs and their topology (nvidia-smi topo -m)
#   3. tests/test_multi_gpu.py: the frames of 2 GPUs equal those of one (tiny model; 1.3B shape at 240x416)
#   4. bench_distributed.py for N = 1, 2, 4 stages, as many as there are GPUs: t2v, 1.3B shape, 480x832, bf16;
#      --rebalance auto from N = 2 on; JSON + markdown into OUTDIR
#   5. the scaling line: FPS(N) and FPS(N) / FPS(1)
# Every step has a timeout drawn from one budget, so that the script ends within 8 minutes whatever hangs.
# The NCCL environment of the machine is used as it is. BENCH_ARGS: extra arguments of every bench_distributed.py
# run (e.g. "--attention sdpa_cudnn"; "--tiny" checks the script itself on a machine without GPUs).
set -u
out=${1:?usage: bash bench/gpu_multi.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
deadline=$(($(date +%s) + 470))

# budget CAP: seconds for the next step, CAP or what is left before the deadline if that is less (at least 1:
# `timeout 0` would mean no limit)
budget() {
  local left=$((deadline - $(date +%s)))
  if ((left < $1)); then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}

timeout "$(budget 120)" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  .whl/*.whl 2>&1 | tail -2
timeout "$(budget 60)" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
timeout 60 python3 -c "
import torch
try:
    v = torch.cuda.nccl.version()
    v = '.'.join(map(str, v)) if isinstance(v, tuple) else v
except Exception as exc:
    v = f'unknown ({exc})'
gpus = torch.cuda.device_count()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', v, 'gpus', gpus,
      torch.cuda.get_device_name() if gpus else '')
"
nvidia-smi topo -m
gpus=$(nvidia-smi -L | wc -l)

echo "== tests (2 GPUs)"
timeout --kill-after=10 "$(budget 150)" python3 -m pytest -x -q -p no:cacheprovider tests/test_multi_gpu.py 2>&1 |
  tail -40

for n in 1 2 4; do
  ((n <= gpus)) || break
  t=$(budget 130)
  if ((t < 40)); then
    echo "== N=$n skipped: $t s left of the budget"
    break
  fi
  rebalance=auto
  ((n == 1)) && rebalance=off
  echo "== bench N=$n (timeout $t s)"
  timeout --kill-after=10 "$t" python3 -m torch.distributed.run --standalone --nproc_per_node="$n" \
    bench/bench_distributed.py --configs t2v --chunks 12 --warmup 3 --rebalance "$rebalance" --timeout 60 \
    --out "$out" ${BENCH_ARGS:-} 2>&1 | grep -v "prompt words not in" | tail -16
  echo "exit status ${PIPESTATUS[0]}"
done

echo "== scaling"
python3 bench/bench_distributed.py --summary "$out"
