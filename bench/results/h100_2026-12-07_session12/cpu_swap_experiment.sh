set -u
common="--vae checkpoints/tinyworld/vae_s4_z8 --init checkpoints/tinyworld/dit_s4_z8 --device cpu --batch 16 --clips 512 --latent-frames 12 --uncond-prob 0.2 --fg-weight 4 --lr 3e-4 --warmup 20 --log-every 50 --threads 2 --minutes 10"
python3 -m stream_runtime.pipelines.tinyworld.train_dit $common --swap-prob 0.5 --out /tmp/cpu_exp/swap > /tmp/cpu_exp/swap.log 2>&1
python3 -m stream_runtime.pipelines.tinyworld.train_dit $common --pair-weight 0.000001 --out /tmp/cpu_exp/control > /tmp/cpu_exp/control.log 2>&1
for t in swap control; do
  python3 -m stream_runtime.pipelines.tinyworld.export --vae checkpoints/tinyworld/vae_s4_z8 --dit /tmp/cpu_exp/$t --out /tmp/cpu_exp/m_$t --guidance-scale 4 > /dev/null 2>&1
  python3 -m stream_runtime.pipelines.tinyworld.shape_probe --model /tmp/cpu_exp/m_$t --threads 2 --out /tmp/cpu_exp/probe_$t.json > /tmp/cpu_exp/probe_$t.log 2>&1
done
echo done > /tmp/cpu_exp/DONE
