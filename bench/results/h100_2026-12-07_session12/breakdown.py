"""Per-figure breakdown of eval_model JSON files: share of asked objects detected, accuracies among the detected
ones, the shape confusion, the commonest motion errors and the detected share by object count.

Usage: python bench/results/h100_2026-12-07_session12/breakdown.py EVAL.json [EVAL.json ...]
"""

import collections
import json
import sys

for path in sys.argv[1:]:
    result = json.load(open(path))
    objects = [o for p in result["per_prompt"] for o in p["objects"]]
    found = [o for o in objects if o["detected"]]
    figures = ("colour", "shape", "motion", "size")
    given = " ".join(f"{k} {sum(o[k + '_ok'] for o in found) / max(1, len(found)):.2f}" for k in figures)
    print(f"{path}: objects {len(objects)}, detected {len(found) / len(objects):.2f} | given detected: {given}")
    shapes = collections.Counter((o["expected"]["shape"], o["detected"]["shape"]) for o in found)
    print("  shape confusion (asked, drawn):", dict(shapes))
    wrong = [o for o in found if not o["motion_ok"]]
    motions = collections.Counter((o["expected"]["motion"], o["detected"]["motion"]) for o in wrong)
    print("  motion errors (asked, drawn):", dict(motions.most_common(8)))
    by_count = collections.defaultdict(list)
    for p in result["per_prompt"]:
        by_count[p["expected_count"]].append(sum(1 for o in p["objects"] if o["detected"]) / p["expected_count"])
    print("  detected share by object count:", {k: round(sum(v) / len(v), 2) for k, v in sorted(by_count.items())})
