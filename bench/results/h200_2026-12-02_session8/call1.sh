#!/usr/bin/env bash
# Session 8, GPU call 1 (run from the repo root on the device machine, wheels in .whl/; OUT set by the device tool):
# two patch-1 tiny-world transformer stages side by side (from scratch; re-patched from the shipped model),
# while the GPU tests and the compiled memory probe (with conv-cache storages) run beside them.
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
M=${MINUTES:-6.5}
GUIDANCE=4 TW_NO_INSTALL=1 TAG=P1s bash bench/gpu_train_tinyworld.sh $r dit $M assets/tinyworld/vae "" \
    --patch 1 --uncond-prob 0.2 --workers 6 > $r/P1s.out 2>&1 &
GUIDANCE=4 TW_NO_INSTALL=1 TAG=P1r bash bench/gpu_train_tinyworld.sh $r dit $M assets/tinyworld/vae assets/tinyworld \
    --patch 1 --uncond-prob 0.2 --lr 2.5e-4 --warmup 50 --workers 6 > $r/P1r.out 2>&1 &
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels_block_sparse.py \
    > $r/gputest.log 2>&1; tail -5 $r/gputest.log
timeout 240 python3 bench/probe_memory.py --compile --cuda-graphs --trace --out $r > $r/memory_graphs.log 2>&1
tail -6 $r/memory_graphs.log
wait
cat $r/P1s.out $r/P1r.out
tar czf $OUT/res.tgz -C $r .
