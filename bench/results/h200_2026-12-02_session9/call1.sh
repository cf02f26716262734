#!/usr/bin/env bash
# Session 9, GPU call 1: the shipped model trained on with the shape-pair term (train_dit --pair-weight), two
# weights side by side; the GPU tests beside them once the data are encoded (correctness only, no timings).
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-7.5}
for w in 4 12; do
  GUIDANCE=4 TW_NO_INSTALL=1 TAG=PW$w bash bench/gpu_train_tinyworld.sh $r dit $M assets/tinyworld/vae assets/tinyworld \
      --uncond-prob 0.2 --lr 2.5e-4 --warmup 20 --workers 7 --clips 8192 --pair-weight $w > $r/PW$w.out 2>&1 &
done
sleep 120
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels_block_sparse.py \
  > $r/gputest.log 2>&1
tail -3 $r/gputest.log
wait
cat $r/PW4.out $r/PW12.out
cp /tmp/twPW4/dit.log $r/dit_PW4.log; cp /tmp/twPW12/dit.log $r/dit_PW12.log
tar czf $OUT/res.tgz -C $r .
