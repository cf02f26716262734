#!/usr/bin/env bash
# Session 10, GPU call 2: one more stage of both 4x-spatial transformers (call 1's G16 / G8 dit folders, carried as
# twinit/), side by side, both through train_dit --compile inductor (call 1: 2,599 steps compiled against 1,565 eager
# in the same 7-minute stage beside each other).
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-7}
C=checkpoints/tinyworld
I=bench/results/h200_2026-12-02_session10/twinit
common="--uncond-prob 0.2 --lr 3e-4 --warmup 50 --workers 7 --compile inductor"
for z in 16 8; do
  GUIDANCE=4 TW_NO_INSTALL=1 TAG=H$z bash bench/gpu_train_tinyworld.sh $r dit $M $C/vae_s4_z$z $I/G$z \
      $common > $r/H$z.out 2>&1 &
done
wait
cat $r/H16.out $r/H8.out
nvidia-smi --query-gpu=name --format=csv,noheader
tar czf $OUT/res.tgz -C $r .
