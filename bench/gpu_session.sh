#!/usr/bin/env bash
# One batched GPU-machine session: install carried wheels, then the parts asked for (default: all, in this order).
# Usage on the device machine (repo root, wheels + peer_sdv2.py in .whl/; SNAPSHOT=x.tgz tars the results after each part):
#   bash bench/gpu_session.sh OUTDIR [tests] [probe] [stream] [batch] [shared] [taehv] [decoder] [attention] [14b] [peer]
#   tests      GPU tests (bf16 streaming vs reference, Triton kernels, attention backends)
#   probe      probe_sdpa_layout.py: do SDPA's backends (cuDNN) run on the stream's [B, L, H, D] views?
#   stream     bench_stream.py 1.3B t2v + v2v with sdpa and sdpa_cudnn (eager; top kernels of one chunk profiled)
#   compiled   bench_stream.py 1.3B t2v + v2v, sdpa, --compile (StreamPipeline.compile: block halves and the VAE)
#   decode     bench_decode.py (issue 6) on cores 8-15, in the background while the GPU parts run (needs >= 16 cores)
#   batch      bench_stream.py 1.3B t2v with --stream-batch (sdpa_cudnn)
#   shared     bench_shared_forwards.py: 1, 2, 4 v2v streams of the 1.3B shape in turn vs in shared forwards
#   taehv      bench_stream.py 1.3B t2v with the TAEHV decoder (random weights of the taew2_1 shape)
#   decoder    bench_latent_decoder.py: Wan VAE (eager, channels-last, compiled) vs TAEHV per latent frame, 480x832
#   attention  bench_attention.py: kernels beside SDPA flash/cuDNN at the 1.3B and 14B shapes
#   attention_split  the same with only the default and the split-K configs (block_sparse_attention(splits=N))
#   attention_ws  the same with the warp-specialised key loop (block_sparse_attention(warp_specialize=True)), into OUT/ws
#   attention_split_v2v  the split-K configs at the v2v shape (1 chunk frame against 3 sink + 2 window: 1,560 x 9,360,
#              a grid of 156 programs at 12 heads, about 1.2 waves of an H200), into OUT/v2v
#   14b        bench_stream.py 14B t2v + v2v (sdpa, compiled blocks, fewer chunks)
#   ahead      bench_stream.py 1.3B t2v + v2v compiled, --decode-ahead (decode beside the next chunk), --early-first-frame
#   graphs     bench_stream.py 1.3B t2v + v2v compiled + CUDA graphs, plain and --decode-ahead, --early-first-frame
#   graphs_cudnn  compiled + CUDA graphs, each config without and with torch.backends.cudnn.benchmark (VAE convs)
#   graphs_cl  the same with the VAE's conv weights channels-last (bench_stream --vae-channels-last)
#   gputest    only the GPU-marked tests (test_gpu.py, the kernels' bf16 test)
#   pacing     bench_pacing.py: 1.3B t2v (compiled) played at 16 fps through stream_runtime.pacing.Paced, jitter
#   pacing_graphs  the same with CUDA graphs
#   peer       the peer (StreamDiffusionV2 from PyPI) in the same session, for ratios, and its peak memory
#   memory     probe_memory.py: where a stream's memory goes (eager, then compiled + CUDA graphs), allocation sites
#   ffn_gelu   probe_ffn_gelu.py: the Wan FFN with cuBLASLt's GELU epilogue against eager / compiled
#   ffn_epilogue  bench_stream.py 1.3B t2v compiled + CUDA graphs, without then with --ffn-epilogue (same call)
set -u
out=${1:-bench/results}
shift || true
parts=${*:-tests probe stream compiled ahead batch shared taehv decoder attention 14b pacing peer}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton, diffusers, transformers; print(torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__, torch.cuda.get_device_name())"
for part in $parts; do
  echo "== $part"
  case $part in
  tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels_block_sparse.py \
           tests/test_attention_backends.py 2>&1 | tail -15 ;;
  stream) for attn in sdpa sdpa_cudnn; do
            timeout 200 python3 bench/bench_stream.py --attention $attn --chunks 8 --profile --out "$out" 2>&1 | tail -4
          done ;;
  compiled) TORCH_LOGS=recompiles timeout 300 python3 bench/bench_stream.py --attention sdpa --chunks 8 --warmup 6 \
              --compile --profile --out "$out" > "$out/compiled.log" 2>&1; grep -c Recompiling "$out/compiled.log"
            tail -4 "$out/compiled.log" ;;
  decode) nproc
          taskset -c 8-15 timeout 540 python3 bench/bench_decode.py --workers 1 2 4 8 --repeats 1 --out "$out" \
            > "$out/decode.log" 2>&1 &
          decode_pid=$! ;;
  probe) timeout 120 python3 bench/probe_sdpa_layout.py --out "$out" 2>&1 | tail -8 ;;
  shared) timeout 240 python3 bench/bench_shared_forwards.py --shape 1.3b --mode v2v --device cuda --sessions 1,2,4 \
            --out "$out" 2>&1 | tail -6 ;;
  batch) timeout 150 python3 bench/bench_stream.py --attention sdpa_cudnn --configs t2v --stream-batch --chunks 8 \
           --out "$out" 2>&1 | tail -3 ;;
  taehv) timeout 150 python3 bench/bench_stream.py --attention sdpa_cudnn --configs t2v --decoder taehv --chunks 8 \
           --out "$out" 2>&1 | tail -3 ;;
  decoder) timeout 300 python3 bench/bench_latent_decoder.py --decoders vae,vae_channels_last,vae_compiled,taehv \
             --latent-frames 24 --warmup 3 --out "$out" 2>&1 | tail -7 ;;
  attention) timeout 150 python3 bench/bench_attention.py --out "$out" 2>&1 | tail -12 ;;
  attention_split_v2v) timeout 150 python3 bench/bench_attention.py --configs split --sink 3 --window 2 --chunk 1 \
                         --out "$out/v2v" 2>&1 | tail -12 ;;
  attention_split) timeout 150 python3 bench/bench_attention.py --configs split --out "$out" 2>&1 | tail -12 ;;
  attention_ws) timeout 200 python3 bench/bench_attention.py --configs ws --out "$out/ws" 2>&1 | tail -12 ;;
  14b) timeout 210 python3 bench/bench_stream.py --model 14b --attention sdpa --compile blocks --chunks 4 --warmup 3 \
         --out "$out" 2>&1 | tail -4 ;;
  ahead) timeout 400 python3 bench/bench_stream.py --attention sdpa --chunks 8 --warmup 6 --compile \
           --decode-ahead --early-first-frame --out "$out" 2>&1 | tail -3 ;;
  gputest) timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels_block_sparse.py \
             2>&1 | tail -15 ;;
  graphs) TORCH_LOGS=recompiles timeout 400 python3 bench/bench_stream.py --attention sdpa --chunks 8 --warmup 6 \
            --compile --cuda-graphs --decode-ahead --early-first-frame --profile --out "$out" > "$out/graphs.log" 2>&1
          grep -c Recompiling "$out/graphs.log"; tail -4 "$out/graphs.log" ;;
  graphs_cudnn) timeout 300 python3 bench/bench_stream.py --attention sdpa --chunks 8 --warmup 4 --compile \
                  --cuda-graphs --early-first-frame --cudnn-benchmark both --out "$out" 2>&1 | tail -7 ;;
  graphs_cl) timeout 300 python3 bench/bench_stream.py --attention sdpa --chunks 8 --warmup 4 --compile \
               --cuda-graphs --early-first-frame --cudnn-benchmark both --vae-channels-last --out "$out" 2>&1 | tail -7 ;;
  ffn_epilogue) for flag in "" "--ffn-epilogue"; do
                  timeout 240 python3 bench/bench_stream.py --attention sdpa --configs t2v --chunks 8 --warmup 4 \
                    --compile --cuda-graphs --early-first-frame --vae-channels-last $flag --out "$out" 2>&1 | tail -3
                done ;;
  pacing_graphs) timeout 300 python3 bench/bench_pacing.py --model random-1.3b --device cuda --compile --cuda-graphs \
                   --seconds 20 --out "$out" 2>&1 | tail -4 ;;
  pacing) timeout 300 python3 bench/bench_pacing.py --model random-1.3b --device cuda --compile --seconds 20 \
            --out "$out" 2>&1 | tail -4 ;;
  memory) timeout 200 python3 bench/probe_memory.py --trace --out "$out" 2>&1 | tail -4
          timeout 400 python3 bench/probe_memory.py --compile --cuda-graphs --trace --out "$out" 2>&1 | tail -4 ;;
  ffn_gelu) timeout 200 python3 bench/probe_ffn_gelu.py --out "$out" 2>&1 | tail -8 ;;
  peer) [ -f .whl/peer_sdv2.py ] && timeout 200 python3 bench/peer_memory.py .whl/peer_sdv2.py --out "$out/peer_sdv2.jsonl" \
          2>&1 | tail -12 ;;
  *) echo "unknown part: $part" >&2 ;;
  esac
  # SNAPSHOT=file.tgz: keep a tarball of the results so far (what comes back if the session is cut short)
  [ -n "${SNAPSHOT:-}" ] && tar czf "$SNAPSHOT" -C "$out" .
done
if [ -n "${decode_pid:-}" ]; then
  echo "== waiting for decode"
  wait "$decode_pid"
  tail -20 "$out/decode.log"
  [ -n "${SNAPSHOT:-}" ] && tar czf "$SNAPSHOT" -C "$out" .
fi
