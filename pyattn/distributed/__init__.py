"""pyattn.distributed: context-parallel attention on torch.distributed (docs/design.md, "Context
parallelism"). Imported on its own (``import pyattn.distributed``): ``import pyattn`` does not
load it.

- :func:`ring_attention`: each rank holds a shard of the sequence (zigzag or contiguous layout);
  key/value shards travel around a ring of point-to-point transfers, overlapped with pyattn's
  fused attention of the previous shard, merged exactly by the log-sum-exp; autograd through the
  ring.
- :func:`allgather_varlen_attention`: packed variable-length batches split across ranks (documents
  may cross shard edges): keys and values all-gathered, then varlen attention.
- :func:`shard_sequence` / :func:`unshard_sequence`: a rank's shard of a whole sequence, and the
  whole sequence back (a differentiable all-gather).
"""

from ._layout import LAYOUTS, shard_positions, shard_sequence, unshard_sequence
from .allgather import allgather_varlen_attention
from .ring import RingError, ring_attention

__all__ = [
    "LAYOUTS",
    "RingError",
    "allgather_varlen_attention",
    "ring_attention",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
