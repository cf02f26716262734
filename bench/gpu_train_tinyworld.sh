#!/usr/bin/env bash
# Train the tiny-world model on one GPU in 10-minute stages that chain (each stage fits one device call).
# Usage on the device machine (repo root, wheels in .whl/; folders from earlier stages carried under out/):
#   bash bench/gpu_train_tinyworld.sh OUTDIR vae MINUTES [INIT_VAE [EXTRA...]]     -> OUTDIR/vae$TAG.tgz
#   bash bench/gpu_train_tinyworld.sh OUTDIR dit MINUTES VAE [INIT_DIT [EXTRA...]] -> OUTDIR/dit$TAG.tgz
# vae$TAG.tgz holds vae/ and vae.log; dit$TAG.tgz holds dit/ (for --init; export it here with the VAE), dit.log and
# eval.json (the exported model over 50 held-out prompts, streamed on the GPU). EXTRA arguments go to the trainer
# (e.g. --freeze-encoder, --context-noise 0.3); pass "" for an absent INIT. Set TW_NO_INSTALL=1 when the wheels are installed already
# (two stages started side by side, e.g. CUDA_VISIBLE_DEVICES=0 / 1 on a 2-GPU machine, with distinct TAGs).
# GUIDANCE=4 exports (and evaluates) the transformer with that classifier-free guidance: for runs with --uncond-prob.
# The VAE recipe: 17-frame clips (5 latent frames: the decoder's steady state, which 9-frame clips never reach,
# is what a stream runs in), a rendered pool on the GPU, foreground-weighted L1 + squared error (L1 alone tied
# the red and green outputs), fp32/TF32 (as fast as bf16 autocast at these shapes, bench/probe_vae_train.py).
set -u
out=${1:?OUTDIR}; stage=${2:?vae|dit}; minutes=${3:?MINUTES}
tag=${TAG:-}
export PYTHONUNBUFFERED=1
if [ -z "${TW_NO_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
m=stream_runtime.pipelines.tinyworld
w=/tmp/tw$tag
mkdir -p $w "$out"
case $stage in
vae)
    init=${4:-}
    python3 -m $m.train_vae --out $w/vae --minutes "$minutes" --device cuda --workers 14 --pool 8192 --frames 17 \
        --batch 48 --fg-weight 9 --l2-weight 1 --precision fp32 --eval-clips 32 ${init:+--init $init --warmup 50} \
        "${@:5}" > $w/vae.log 2>&1
    tail -n 3 $w/vae.log
    tar czf "$out/vae$tag.tgz" -C $w vae vae.log
    ;;
dit)
    vae=${4:?VAE folder}; init=${5:-}
    python3 -m $m.train_dit --vae "$vae" --out $w/dit --minutes "$minutes" --device cuda --workers 14 \
        --batch 256 --clips 6144 --latent-frames 12 --encode-batch 256 ${init:+--init $init} "${@:6}" > $w/dit.log 2>&1
    tail -n 3 $w/dit.log
    python3 -m $m.export --vae "$vae" --dit $w/dit --out $w/model --guidance-scale "${GUIDANCE:-1}" 2>&1 | tail -3
    timeout 150 python3 -m $m.eval_model --model $w/model --device cuda --prompts 50 --out $w/eval.json 2>&1 | tail -4
    tar czf "$out/dit$tag.tgz" -C $w dit dit.log $(cd $w && ls eval.json 2>/dev/null)
    ;;
*) echo "stage: expected vae or dit, got $stage" >&2; exit 2 ;;
esac
