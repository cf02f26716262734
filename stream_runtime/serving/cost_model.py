"""Measured costs of the engine's work, for the SLO scheduler: forwards by batch composition, and chunk decodes.

A *workload* is everything that makes one forward of one session cost what it costs: the resolution, the chunk and
cache sizes, the mode. Its costs are kept per forward *shape* ``(chunks, sessions)``:

- ``(1, 1)``: one pass of one chunk of one session (a step of the sequential schedule, or the first forward of a
  stream batch's warm-up);
- ``(k, 1)``: a stream-batch forward that carries ``k`` chunks of one session, each at its own pass;
- ``(k, g)``: the same with ``g`` sessions of the same workload in one forward.

plus the decode of one chunk (streaming VAE, copy to the host). The engine measures whole calls (a chunk's
denoising, its decode) whose forward shapes it knows; :meth:`CostModel.observe_forwards` splits a call over its
forwards in proportion to their current estimates, so a homogeneous call (a sequential chunk, a steady stream
batch) is measured exactly and a warm-up call is attributed sensibly.

Each cost is a :class:`RobustEstimator`: an exponential moving average of the median of the last few samples, so
a single slow call (a garbage collection, a page fault) does not move it and a lasting change does. A calibration
seeds the estimators before any session runs.

Example::

    costs = CostModel()
    w = Workload("t2v 480x832 c3 k9", size=480 * 832 * 3)
    costs.seed(w, (1, 1), 0.040)                # calibration: one pass
    costs.observe_forwards(w, [(1, 1)] * 5, 0.21)  # a sequential chunk of 5 passes took 0.21 s
    costs.forward_s(w, 1)                        # -> about 0.042
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, int]
"""A forward's composition: (chunks per session, sessions)."""


@dataclass(frozen=True)
class Workload:
    """The cost class of a session's forwards; sessions of one workload may share a forward."""

    key: str
    """Identifies the workload (resolution, chunk and cache sizes, mode), e.g. ``"t2v 480x832 c3 k9"``."""
    size: float
    """Work per forward in any unit proportional to it (pixels times chunk frames): a workload never measured is
    first estimated from a measured one scaled by the ratio of sizes."""

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"key must be a non-empty string, got {self.key!r}")
        if not self.size > 0:
            raise ValueError(f"size must be > 0, got {self.size!r}")


class RobustEstimator:
    """An EWMA of the running median of the last ``window`` samples (seconds).

    ``alpha`` is the weight of the newest median (1: follow the median at once). The first sample (or
    :meth:`seed`) sets the estimate outright.

    Example::

        est = RobustEstimator(alpha=0.5, window=3)
        for x in (1.0, 1.0, 9.0):   # one outlier
            est.add(x)
        est.value                    # -> 1.0: the median of (1, 1, 9) is 1
    """

    def __init__(self, alpha: float = 0.3, window: int = 5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.alpha = alpha
        self.samples: deque[float] = deque(maxlen=window)
        self.value: float | None = None
        """The current estimate; None before any sample or seed."""
        self.count = 0
        """Samples added (seeds not counted)."""

    def seed(self, value: float) -> None:
        """Set the estimate (a calibration); later samples move it as usual."""
        _check_seconds("value", value)
        self.value = float(value)

    def add(self, value: float) -> None:
        _check_seconds("value", value)
        self.samples.append(float(value))
        self.count += 1
        median = statistics.median(self.samples)
        self.value = median if self.value is None else self.value + self.alpha * (median - self.value)


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")


class CostModel:
    """Per-workload estimates of forward and decode times; thread-safe (the engine writes, admission reads).

    Estimates that were never measured are derived, from the most specific to the least:

    1. ``(k, g)`` between two measured shapes of the same workload and sessions ``g``: linear interpolation in k;
    2. otherwise ``k * g`` times the ``(1, 1)`` pass (no batching gain assumed: a pessimistic bound);
    3. a workload with nothing measured: the costs of the measured workload nearest in ``size``, scaled by the
       ratio of sizes.
    """

    def __init__(self, alpha: float = 0.3, window: int = 5) -> None:
        self._make = lambda: RobustEstimator(alpha, window)
        self._lock = threading.Lock()
        self._forwards: dict[Workload, dict[Shape, RobustEstimator]] = {}
        self._decodes: dict[Workload, RobustEstimator] = {}

    # -- writing

    def seed(self, workload: Workload, shape: Shape, seconds: float) -> None:
        """Seed the estimate of one forward of ``shape`` (a calibration)."""
        with self._lock:
            self._forward(workload, _check_shape(shape)).seed(seconds)

    def seed_decode(self, workload: Workload, seconds: float) -> None:
        with self._lock:
            self._decode(workload).seed(seconds)

    def observe_forwards(self, workload: Workload, shapes: Sequence[Shape], seconds: float) -> None:
        """``seconds`` of wall time ran the forwards ``shapes``; add one sample per distinct shape."""
        _check_seconds("seconds", seconds)
        shapes = [_check_shape(s) for s in shapes]
        if not shapes:
            raise ValueError("shapes must list the forwards the time was spent on, got none")
        with self._lock:
            counts: dict[Shape, int] = {}
            for s in shapes:
                counts[s] = counts.get(s, 0) + 1
            predicted = {s: self._predict(workload, s) for s in counts}
            if len(counts) > 1 and all(p is not None and p > 0 for p in predicted.values()):
                total = sum(predicted[s] * n for s, n in counts.items())
                shares = {s: seconds * predicted[s] / total for s in counts}  # per forward of shape s
            else:  # one shape, or nothing to split by yet: every forward took the same time
                shares = dict.fromkeys(counts, seconds / len(shapes))
            for s, share in shares.items():
                self._forward(workload, s).add(share)

    def observe_decode(self, workload: Workload, seconds: float) -> None:
        with self._lock:
            self._decode(workload).add(seconds)

    # -- reading

    def forward_s(self, workload: Workload, chunks: int, sessions: int = 1) -> float | None:
        """Predicted seconds of one forward of ``chunks`` chunks of each of ``sessions`` sessions; None if no
        workload was ever measured or seeded."""
        with self._lock:
            return self._predict(workload, _check_shape((chunks, sessions)))

    def decode_s(self, workload: Workload) -> float | None:
        """Predicted seconds to decode one chunk (and copy it to the host)."""
        with self._lock:
            est = self._decodes.get(workload)
            if est is not None and est.value is not None:
                return est.value
            donor = self._nearest(workload, self._decodes)
            return None if donor is None else self._decodes[donor].value * workload.size / donor.size

    def known(self, workload: Workload) -> bool:
        """Whether this workload itself has a measured or seeded forward."""
        with self._lock:
            return any(e.value is not None for e in self._forwards.get(workload, {}).values())

    def snapshot(self) -> dict:
        """``{workload key: {"forward_s": {"kxg": s}, "decode_s": s, "samples": n}}`` of measured or seeded
        estimates (derived ones left out)."""
        with self._lock:
            out = {}
            for w in set(self._forwards) | set(self._decodes):
                forwards = {f"{k}x{g}": e.value for (k, g), e in sorted(self._forwards.get(w, {}).items())}
                decode = self._decodes.get(w)
                samples = sum(e.count for e in self._forwards.get(w, {}).values())
                out[w.key] = {
                    "forward_s": {k: v for k, v in forwards.items() if v is not None},
                    "decode_s": None if decode is None else decode.value,
                    "samples": samples,
                }
            return out

    # -- internals (under the lock)

    def _forward(self, workload: Workload, shape: Shape) -> RobustEstimator:
        return self._forwards.setdefault(workload, {}).setdefault(shape, self._make())

    def _decode(self, workload: Workload) -> RobustEstimator:
        return self._decodes.setdefault(workload, self._make())

    def _predict(self, workload: Workload, shape: Shape) -> float | None:
        table = {s: e.value for s, e in self._forwards.get(workload, {}).items() if e.value is not None}
        if not table:
            donor = self._nearest(workload, self._forwards)
            if donor is None:
                return None
            scale = workload.size / donor.size
            table = {s: e.value * scale for s, e in self._forwards[donor].items() if e.value is not None}
        if shape in table:
            return table[shape]
        k, g = shape
        same_g = sorted(c for c, gg in table if gg == g)
        below = [c for c in same_g if c < k]
        above = [c for c in same_g if c > k]
        if below and above:
            lo, hi = below[-1], above[0]
            a, b = table[(lo, g)], table[(hi, g)]
            return a + (b - a) * (k - lo) / (hi - lo)
        if (1, 1) in table:
            return table[(1, 1)] * k * g
        base_k, base_g = min(table, key=lambda s: s[0] * s[1])  # smallest measured shape, scaled by work
        return table[(base_k, base_g)] * (k * g) / (base_k * base_g)

    def _nearest(self, workload: Workload, measured: dict) -> Workload | None:
        def has_value(w) -> bool:
            entry = measured[w]
            if isinstance(entry, dict):  # forward estimates by shape
                return any(e.value is not None for e in entry.values())
            return entry.value is not None

        candidates = [w for w in measured if w != workload and has_value(w)]
        if not candidates:
            return None
        return min(candidates, key=lambda w: abs(w.size - workload.size))


def _check_shape(shape: Shape) -> Shape:
    if (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
    ):
        raise ValueError(f"a forward shape must be (chunks >= 1, sessions >= 1) integers, got {shape!r}")
    return shape
