#!/usr/bin/env bash
# Session 9, GPU call 3: the shipped transformer moved onto the 4x VAEs of call 2 (train_dit --init assets/tinyworld
# --fresh-io --patch 2: its blocks kept, new patch embedding and output projection), z_dim 16 and 8 side by side.
# twinit/S4z16 and twinit/S4z8 are call 2's vae/ folders, carried as untracked folders of the working tree.
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-6}
for z in 16 8; do
  GUIDANCE=4 TW_NO_INSTALL=1 TAG=F$z bash bench/gpu_train_tinyworld.sh $r dit $M twinit/S4z$z assets/tinyworld \
      --fresh-io --patch 2 --uncond-prob 0.2 --lr 4e-4 --warmup 100 --workers 7 > $r/F$z.out 2>&1 &
done
wait
cat $r/F16.out $r/F8.out
tar czf $OUT/res.tgz -C $r .
