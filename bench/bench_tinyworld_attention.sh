#!/usr/bin/env bash
# Issue #3's quality table: the tiny-world evaluation (colour, shape, motion, stability) for dense attention,
# radial, cross-step reuse and radial + reuse, side by side. Run on a GPU (the Triton backends run on CPU only
# under the interpreter, far too slowly for 50 prompts).
# Usage: bash bench/bench_tinyworld_attention.sh MODEL_FOLDER OUTDIR [PROMPTS]
set -u
model=${1:?MODEL}; out=${2:?OUTDIR}; prompts=${3:-50}
mkdir -p "$out"
run() {  # label, extra args
    label=$1; shift
    python3 -m stream_runtime.pipelines.tinyworld.eval_model --model "$model" --device cuda --prompts "$prompts" \
        --stability 240 --stability-prompts 2 --out "$out/tinyworld_attention_$label.json" "$@" 2>&1 | tail -n 3
}
run dense --attention sdpa --reuse 0
run blocksparse_dense --attention blocksparse --reuse 0
run radial --attention radial --reuse 0
run reuse --attention sdpa --reuse 2
run radial_reuse --attention radial --reuse 2
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| mode | colour | shape | motion | stable (sink) | steady FPS |", "|---|---|---|---|---|---|"]
for label in ("dense", "blocksparse_dense", "radial", "reuse", "radial_reuse"):
    r = json.loads((out / f"tinyworld_attention_{label}.json").read_text())
    st = r["stability"]["with_sink"]["stable_fraction"]
    rows.append(f"| {label} | {r['colour_accuracy']:.3f} | {r['shape_accuracy']:.3f} | {r['motion_accuracy']:.3f} "
                f"| {st:.2f} | {r['steady_fps_median']:.1f} |")
(out / "tinyworld_attention.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
