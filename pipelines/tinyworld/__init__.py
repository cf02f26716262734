"""The tiny-world: a procedural video world, its captions and an OpenCV evaluator."""
