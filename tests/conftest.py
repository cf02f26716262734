import os

# The tests run tiny models: one intra-op thread is as fast, and two threads spin against each other (and against
# the engine and server threads of the serving tests) on a 2-core machine, slowing some tests several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels run in Triton's interpreter without CUDA; @triton.jit reads this when a kernel is defined, so it
# must be set before any test module imports triton (diffusers may import it indirectly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# One place for tolerances per dtype (STYLE.md): (atol, rtol).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """Compare with the tolerance of ``dtype`` (default: ``expected``'s dtype), optionally loosened by ``scale``."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it (some commands under test set their own count).
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ENGINE_STOP_S = 60.0  # how long make_engine's teardown waits for an engine thread: a guard against hangs


@pytest.fixture
def make_engine(pipe):
    """``make_engine(**config) -> Engine``: a serving engine (not started) with ``EngineConfig(**config)`` on the
    test module's ``pipe`` fixture; every engine it made is stopped after the test."""
    from stream_runtime.serving import Engine, EngineConfig  # here: most test modules never load the serving engine

    engines = []

    def make(**config) -> Engine:
        engine = Engine(pipe, EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(timeout=ENGINE_STOP_S)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
