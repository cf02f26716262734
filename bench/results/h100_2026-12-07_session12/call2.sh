#!/usr/bin/env bash
# Session 12, GPU call 2: two 5-minute stages from call 1's stage A (carried as twinit/A), side by side:
#   C: --fg-weight 4 --sink-weight 4 (the sink frame, drawn from the prompt alone, weighs 4x the window frames)
#   D: --fg-weight 4 (control: A's recipe continued)
# Beside them: the GPU tests (bf16 kernels, radial + reuse split) and the shipped model's 50 held-out prompts with
# radial + reuse 2 (call 1's run of that mode used dense attention for the cached part: reuse ignored the backend).
set -u
export PYTHONUNBUFFERED=1
r=/tmp/res; mkdir -p $r
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
M=${MINUTES:-5}
C=checkpoints/tinyworld
I=bench/results/h100_2026-12-07_session12/twinit
common="--uncond-prob 0.2 --warmup 50 --workers 7 --compile inductor --fg-weight 4 --lr 3e-4"
GUIDANCE=4 TW_NO_INSTALL=1 TAG=C bash bench/gpu_train_tinyworld.sh $r dit $M $C/vae_s4_z8 $I/A \
    $common --sink-weight 4 > $r/C.out 2>&1 &
GUIDANCE=4 TW_NO_INSTALL=1 TAG=D bash bench/gpu_train_tinyworld.sh $r dit $M $C/vae_s4_z8 $I/A \
    $common > $r/D.out 2>&1 &
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels_block_sparse.py \
    > $r/gputest.log 2>&1
tail -n 3 $r/gputest.log
m=stream_runtime.pipelines.tinyworld.eval_model
timeout 150 python3 -m $m --model assets/tinyworld --device cuda --prompts 50 --attention radial --reuse 2 \
    --out $r/attn_radialreuse2.json > $r/attn_radialreuse2.log 2>&1
tail -n 2 $r/attn_radialreuse2.log
wait
cat $r/C.out $r/D.out
nvidia-smi --query-gpu=name --format=csv,noheader
tar czf $OUT/res.tgz -C $r .
