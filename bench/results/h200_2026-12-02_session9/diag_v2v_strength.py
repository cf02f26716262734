"""Video-to-video from the world's own clips at several strengths: does the model keep the shapes it is shown?

Usage: python bench/results/h200_2026-12-02_session9/diag_v2v_strength.py MODEL PROMPTS S1,S2,...
(the first PROMPTS held-out scenes, 33 rendered frames each, pushed into a v2v session with their own caption;
the evaluator scores the output against the caption).
"""

import sys

import numpy as np
import torch

from stream_runtime.pipelines.tinyworld.evaluate import evaluate
from stream_runtime.pipelines.tinyworld.world import caption, held_out_seeds, render, sample_spec
from stream_runtime.pipelines.wan.pipeline import StreamPipeline

torch.set_num_threads(2)
pipe = StreamPipeline.from_pretrained(sys.argv[1])
specs = [sample_spec(s) for s in held_out_seeds()[: int(sys.argv[2])]]
captions = [caption(s) for s in specs]
inputs = [render(s, 33, 64, 64) for s in specs]
for strength in (float(x) for x in sys.argv[3].split(",")):
    clips = []
    for i, (frames, text) in enumerate(zip(inputs, captions, strict=True)):
        with pipe.session(text, seed=i, mode="v2v", strength=strength) as session:
            session.push_frames(frames)
            out = []
            while sum(len(o) for o in out) < 29:
                out.append(next(session))
        clips.append(np.concatenate(out))
    scores = evaluate(clips, captions)
    print(strength, {k: round(v, 3) for k, v in scores.items() if k.endswith("accuracy")}, flush=True)
