"""The tiny-world: a procedural video world, its captions and an OpenCV evaluator.

Modules: ``spec`` (palette, shapes, motions, scene dataclasses), ``world`` (sampling, rendering, seed split,
captions re-exported from ``captions``), ``segment`` (per-frame image analysis), ``evaluate`` (tracking,
scores, stability) and ``selfcheck`` (the evaluator measured on clean held-out renders).
"""
