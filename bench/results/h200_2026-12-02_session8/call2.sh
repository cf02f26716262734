#!/usr/bin/env bash
# Session 8, GPU call 2: the re-patched stage P1r (call 1) continued two ways side by side (twinit/P1r carried
# as an untracked folder of the working tree).
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-7.5}
GUIDANCE=4 TW_NO_INSTALL=1 TAG=P1r2a bash bench/gpu_train_tinyworld.sh $r dit $M assets/tinyworld/vae twinit/P1r \
    --patch 1 --uncond-prob 0.2 --lr 2.5e-4 --warmup 20 --workers 7 > $r/P1r2a.out 2>&1 &
GUIDANCE=4 TW_NO_INSTALL=1 TAG=P1r2b bash bench/gpu_train_tinyworld.sh $r dit $M assets/tinyworld/vae twinit/P1r \
    --patch 1 --uncond-prob 0.2 --lr 1.2e-4 --warmup 20 --workers 7 --seed 3 > $r/P1r2b.out 2>&1 &
wait
cat $r/P1r2a.out $r/P1r2b.out
tar czf $OUT/res.tgz -C $r .
