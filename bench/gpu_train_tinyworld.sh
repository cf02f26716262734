#!/usr/bin/env bash
# Train the tiny-world model on one GPU in 10-minute stages that chain (each stage fits one device call).
# Usage on the device machine (repo root, wheels in .whl/; folders from earlier stages carried under out/):
#   bash bench/gpu_train_tinyworld.sh OUTDIR vae MINUTES [INIT_VAE]       -> OUTDIR/vae.tgz (folder vae/), vae.log
#   bash bench/gpu_train_tinyworld.sh OUTDIR dit MINUTES VAE [INIT_DIT]   -> OUTDIR/dit.tgz, model.tgz (exported), logs
# The VAE recipe: 17-frame clips (5 latent frames: the decoder's steady state, which 9-frame clips never reach,
# is what a stream runs in), a rendered pool on the GPU, foreground-weighted L1 + squared error (L1 alone tied
# the red and green outputs), fp32/TF32 (as fast as bf16 autocast at these shapes, bench/probe_vae_train.py).
set -u
out=${1:?OUTDIR}; stage=${2:?vae|dit}; minutes=${3:?MINUTES}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
m=stream_runtime.pipelines.tinyworld
w=/tmp/tw
mkdir -p $w
case $stage in
vae)
    init=${4:-}
    python3 -m $m.train_vae --out $w/vae --minutes "$minutes" --device cuda --workers 14 --pool 8192 --frames 17 \
        --batch 48 --fg-weight 9 --l2-weight 1 --precision fp32 --eval-clips 32 ${init:+--init $init --warmup 50} \
        > "$out/vae.log" 2>&1
    tail -n 3 "$out/vae.log"
    tar czf "$out/vae.tgz" -C $w vae
    ;;
dit)
    vae=${4:?VAE folder}; init=${5:-}
    python3 -m $m.train_dit --vae "$vae" --out $w/dit --minutes "$minutes" --device cuda --workers 14 \
        --batch 256 --clips 6144 --latent-frames 12 --encode-batch 256 ${init:+--init $init} > "$out/dit.log" 2>&1
    tail -n 3 "$out/dit.log"
    python3 -m $m.export --vae "$vae" --dit $w/dit --out $w/model 2>&1 | tail -3
    tar czf "$out/dit.tgz" -C $w dit
    tar czf "$out/model.tgz" -C $w model
    ;;
*) echo "stage: expected vae or dit, got $stage" >&2; exit 2 ;;
esac
