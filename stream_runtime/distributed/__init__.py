"""One stream over several processes: pipeline stages that each own a contiguous range of transformer blocks and
their KV cache, with the stream batch circulating through a ring of stages (``torchrun -m
stream_runtime.distributed.generate``), and the server's engine over such a ring (``torchrun -m
stream_runtime.distributed.serve``)."""

from .comm import Channel, StageError, init_stage_groups
from .partition import balance, even_partition, ranges_from_bounds, stage_times
from .ring import RingSession, StageRing, run_stage_loop
from .stage import PipelineStage, RunPlan, switch_forward

__all__ = [
    "Channel",
    "PipelineStage",
    "RingSession",
    "RunPlan",
    "StageError",
    "StageRing",
    "balance",
    "even_partition",
    "init_stage_groups",
    "run_stage_loop",
    "ranges_from_bounds",
    "stage_times",
    "switch_forward",
]
