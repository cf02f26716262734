"""The embedded tiny-world captioner: reads a window of frames and writes the world's caption.

Modules: ``model`` (:class:`TinyWorldCaptioner`, its config and files), ``stream`` (:class:`CaptionStream`:
sliding-window captions of a frame stream, each frame computed once), ``data`` (rendered training windows and
degradations), ``train`` (the training command), ``evaluate`` (held-out caption and per-attribute accuracy).
"""
