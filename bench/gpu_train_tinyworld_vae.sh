#!/usr/bin/env bash
# Train two tiny-world VAE candidates side by side on one GPU (the tiny model leaves most of an H100 idle).
# Usage on the device machine (repo root, wheels in .whl/):
#   bash bench/gpu_train_tinyworld_vae.sh OUTDIR MINUTES [INIT_A INIT_B]
# Writes OUTDIR/vae_{a,b}.log and OUTDIR/vae_{a,b}.tgz (diffusers folders with train_log.json).
# fp32 (TF32): bench/probe_vae_train.py measured it as fast as bf16 autocast at these shapes on an H100.
set -u
out=${1:?OUTDIR}; minutes=${2:-7.5}; init_a=${3:-}; init_b=${4:-}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
m=stream_runtime.pipelines.tinyworld.train_vae
w=/tmp/tw
# Insurance: if pooled rendering does not finish a small pool in a minute, fall back to DataLoader rendering.
pool=16384
timeout 60 python3 -c "import time; from stream_runtime.pipelines.tinyworld.train_data import ClipDataset, render_pool
t = time.time(); render_pool(ClipDataset(9, 64), 2048, 7); print(f'pool check: 2048 clips in {time.time() - t:.1f} s')" || pool=0
common="--minutes $minutes --device cuda --workers 7 --pool $pool --batch 64 --eval-clips 32 --fg-weight 9 --precision fp32"
python3 -m $m --out $w/vae_a $common --base-dim 12 --lr 1e-3 ${init_a:+--init $init_a} > "$out/vae_a.log" 2>&1 &
python3 -m $m --out $w/vae_b $common --base-dim 16 --lr 1.5e-3 ${init_b:+--init $init_b} > "$out/vae_b.log" 2>&1 &
wait
tail -4 "$out"/vae_*.log
for v in a b; do tar czf "$out/vae_$v.tgz" -C $w vae_$v; done
