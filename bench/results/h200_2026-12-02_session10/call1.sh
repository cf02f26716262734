#!/usr/bin/env bash
# Session 10, GPU call 1: the 4x-spatial transformers of session 9 (checkpoints/tinyworld/dit_s4_z16, dit_s4_z8),
# one more stage each, side by side; the z8 stage tries train_dit --compile inductor (first GPU run of it). If that
# stage dies early, it restarts without compile for the time left.
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-7}
C=checkpoints/tinyworld
common="--uncond-prob 0.2 --lr 3e-4 --warmup 50 --workers 7"
GUIDANCE=4 TW_NO_INSTALL=1 TAG=G16 bash bench/gpu_train_tinyworld.sh $r dit $M $C/vae_s4_z16 $C/dit_s4_z16 \
    $common > $r/G16.out 2>&1 &
t0=$(date +%s)
GUIDANCE=4 TW_NO_INSTALL=1 TAG=G8 bash bench/gpu_train_tinyworld.sh $r dit $M $C/vae_s4_z8 $C/dit_s4_z8 \
    $common --compile inductor > $r/G8.out 2>&1
if ! grep -q "saved" /tmp/twG8/dit.log; then
  el=$(( $(date +%s) - t0 ))
  echo "compiled stage failed after ${el}s" >> $r/G8.out
  cp /tmp/twG8/dit.log $r/G8_compile_fail.log
  left=$(python3 -c "print(max(1.0, ($M*60 - $el - 20) / 60))")
  GUIDANCE=4 TW_NO_INSTALL=1 TAG=G8 bash bench/gpu_train_tinyworld.sh $r dit $left $C/vae_s4_z8 $C/dit_s4_z8 \
      $common >> $r/G8.out 2>&1
fi
wait
cat $r/G16.out $r/G8.out
nvidia-smi --query-gpu=name --format=csv,noheader
tar czf $OUT/res.tgz -C $r .
