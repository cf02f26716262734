"""Which transformer blocks each pipeline stage owns: contiguous ranges, and balancing them by measured cost."""

from __future__ import annotations


def ranges_from_bounds(bounds: list[int], num_layers: int) -> list[range]:
    """Ranges ``[0, b1), [b1, b2), ..., [bk, num_layers)`` from the inner boundaries ``[b1, ..., bk]``."""
    edges = [0, *bounds, num_layers]
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(
            f"block boundaries must increase strictly inside (0, {num_layers}) so that every stage owns a block, "
            f"got {bounds}"
        )
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]


def even_partition(num_layers: int, stages: int) -> list[range]:
    """Contiguous ranges of near-equal size, the earlier stages one block larger when it does not divide."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"stages must be in [1, num_layers={num_layers}] (each stage owns a block), got {stages}")
    base, extra = divmod(num_layers, stages)
    bounds, edge = [], 0
    for s in range(stages - 1):
        edge += base + (s < extra)
        bounds.append(edge)
    return ranges_from_bounds(bounds, num_layers)


def stage_times(ranges: list[range], block_costs: list[float], extra_costs: list[float]) -> list[float]:
    """Time per forward of each stage: its blocks plus its own extra work (embedding, head, decode)."""
    return [extra + sum(block_costs[i] for i in r) for r, extra in zip(ranges, extra_costs, strict=True)]


def balance(block_costs: list[float], extra_costs: list[float]) -> list[range]:
    """Contiguous ranges (one per entry of ``extra_costs``, each at least one block) that minimise the slowest
    stage's time, ``extra_costs[s] + sum(block_costs[range_s])``. Exact (dynamic programming over boundaries)."""
    n, stages = len(block_costs), len(extra_costs)
    if not 1 <= stages <= n:
        raise ValueError(f"need between 1 and {n} stages (each owns a block), got {stages}")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][j]: the slowest of stages 0..s-1 when they own blocks [0, j); cut[s][j]: where stage s-1 starts.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                worst = max(best[s - 1][i], extra_costs[s - 1] + prefix[j] - prefix[i])
                if worst < best[s][j]:
                    best[s][j], cut[s][j] = worst, i
    bounds, j = [], n
    for s in range(stages, 1, -1):
        j = cut[s][j]
        bounds.append(j)
    return ranges_from_bounds(sorted(bounds), n)
