"""Guidance against the shape siblings' captions: negative prompt = the caption with every shape rotated (k = 1),
so guidance amplifies what the shape words change. Usage: python shape_negative.py MODEL OUT.json [SCALE]"""

import json
import sys

import torch

from stream_runtime.pipelines.tinyworld import eval_model
from stream_runtime.pipelines.tinyworld.train_data import shapes_rotated
from stream_runtime.pipelines.tinyworld.world import caption, held_out_seeds, sample_spec
from stream_runtime.pipelines.wan.pipeline import StreamPipeline

torch.set_num_threads(2)
model, out = sys.argv[1], sys.argv[2]
scale = float(sys.argv[3]) if len(sys.argv) > 3 else 4.0
negative = {caption(sample_spec(s)): caption(shapes_rotated(sample_spec(s), 1)) for s in held_out_seeds()}
plain = eval_model.stream_clip


def stream_clip(pipe, prompt, seed, frames, **overrides):
    return plain(pipe, prompt, seed, frames, negative_prompt=negative[prompt], guidance_scale=scale, **overrides)


eval_model.stream_clip = stream_clip
pipe = StreamPipeline.from_pretrained(model)
result = eval_model.evaluate_prompts(pipe, 50, 32)
json.dump(result, open(out, "w"), default=str)
print({k: round(result[k], 3) for k in ("colour_accuracy", "shape_accuracy", "motion_accuracy", "count_accuracy")})
