#!/usr/bin/env bash
# Session 9, GPU call 2: first stages of a 4x-spatial tiny-world VAE (train_vae --spatial 4: 16x16 latents at
# 64x64), z_dim 16 and z_dim 8 side by side.
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-7.5}
for z in 16 8; do
  TW_NO_INSTALL=1 TAG=S4z$z bash bench/gpu_train_tinyworld.sh $r vae $M "" --spatial 4 --z-dim $z --workers 8 \
      > $r/S4z$z.out 2>&1 &
done
wait
cat $r/S4z16.out $r/S4z8.out
tar czf $OUT/res.tgz -C $r .
