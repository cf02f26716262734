#!/usr/bin/env bash
# Train the tiny-world model on one GPU (both stages), export it, evaluate it; results under OUTDIR.
# Usage on the device machine (repo root, wheels in .whl/): bash bench/gpu_train_tinyworld.sh OUTDIR [VAE_MIN DIT_MIN]
set -u
out=${1:?OUTDIR}; vae_min=${2:-3.5}; dit_min=${3:-4.5}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
m=stream_runtime.pipelines.tinyworld
w=/tmp/tw
python3 -m $m.train_vae --out $w/vae --minutes "$vae_min" --device cuda --workers 8 2>&1 | tail -12
python3 -m $m.train_dit --vae $w/vae --out $w/dit --minutes "$dit_min" --device cuda 2>&1 | tail -20
python3 -m $m.export --vae $w/vae --dit $w/dit --out $w/model 2>&1 | tail -5
tar czf "$out/tinyworld_model.tgz" -C $w model
tar czf "$out/tinyworld_runs.tgz" -C $w --exclude='*.safetensors' --exclude='*.pt' vae dit
timeout 120 python3 -m $m.eval_model --model $w/model --prompts 50 --device cuda --out "$out/tinyworld_eval.json" 2>&1 | tail -15
