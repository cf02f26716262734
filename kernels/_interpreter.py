"""Run Triton kernels on CPU tensors through Triton's interpreter when no CUDA device is present.

Every kernel module calls :func:`use_interpreter_without_cuda` before defining its ``@triton.jit`` functions:
``@triton.jit`` reads ``TRITON_INTERPRET`` when a function is decorated. An explicit ``TRITON_INTERPRET`` (``0`` or
``1``) in the environment is always respected.

Best practice is still to set ``TRITON_INTERPRET=1`` before anything imports ``triton`` (the environment, or the
top of the test suite's ``conftest.py``); the repairs below cover a process where some other import (diffusers, for
one) loaded ``triton`` first, and Triton 3.6's interpreter under NumPy >= 2.4.
"""

from __future__ import annotations

import os
import sys

import torch

_TRUE = ("1", "true", "on", "yes")


def use_interpreter_without_cuda() -> None:
    """Default ``TRITON_INTERPRET=1`` without CUDA, and repair the interpreter where needed (see module doc)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE:
        _fix_interpreter_scalar_index()
        _reinterpret_triton_language()


def _fix_interpreter_scalar_index() -> None:
    """Work around triton-lang/triton#9171 (fixed upstream by #9172, after Triton 3.6).

    The interpreter holds scalars as 1-element arrays and converts them with ``int(array)``, which NumPy 2.4 turned
    into a TypeError; any loop bound read from memory (``range(0, count)``) then fails. The upstream fix squeezes the
    array first; this wrapper re-installs ``tensor.__index__`` that way after the interpreter's own patching.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _reinterpret_triton_language() -> None:
    """Swap compiled-mode helpers of ``triton.language`` (``tl.zeros``, ``tl.max``, ``tl.sum``, ...) for
    interpreted ones.

    Those helpers are themselves ``@triton.jit`` functions, decorated when ``triton.language`` is first imported.
    If that import came before ``TRITON_INTERPRET=1`` was set, they are compiled-mode functions, and an interpreted
    kernel that calls one fails with "Cannot call @triton.jit'd outside of the scope of a kernel". Each such helper
    is replaced, wherever ``triton`` modules or ``tl.tensor`` hold it, by one interpreted function (one per helper,
    so identity checks such as the interpreter's fast path for ``tl.max`` keep working).
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(getattr(tl, "zeros", None), JITFunction):
        return  # triton.language was imported in interpreter mode: nothing to repair
    replaced: dict[int, InterpretedFunction] = {}

    def interpreted(fn: JITFunction) -> InterpretedFunction:
        if id(fn) not in replaced:
            replaced[id(fn)] = InterpretedFunction(fn.fn)
        return replaced[id(fn)]

    namespaces = [vars(m) for name, m in list(sys.modules.items()) if name.startswith("triton.") and m is not None]
    for namespace in namespaces:
        for name, value in list(namespace.items()):
            if isinstance(value, JITFunction) and value.fn.__module__.startswith("triton.language"):
                namespace[name] = interpreted(value)
    for name, value in list(vars(tl.tensor).items()):
        if isinstance(value, JITFunction):
            setattr(tl.tensor, name, interpreted(value))
