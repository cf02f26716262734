"""Frames 4 and 16 of "a large red <shape> still on a black background" for the three shapes (rows) and four
seeds (columns), as one image: does the shape word change what the model draws?

Usage: python bench/results/h200_2026-12-02_session9/diag_single_prompts.py MODEL OUT.png
"""

import sys

import cv2
import numpy as np
import torch

from stream_runtime.pipelines.wan.pipeline import StreamPipeline

torch.set_num_threads(2)
pipe = StreamPipeline.from_pretrained(sys.argv[1])
rows = []
for shape in ["circle", "square", "triangle"]:
    row = []
    for seed in range(4):
        with pipe.session(f"a large red {shape} still on a black background", seed=seed) as s:
            fr = []
            while len(fr) < 20:
                fr.extend(list(next(s)))
        row.append(np.concatenate([fr[4], fr[16]], 0))
    rows.append(np.concatenate(row, 1))
img = np.concatenate(rows, 0)
cv2.imwrite(sys.argv[2], cv2.resize(img[..., ::-1], None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST))
