"""Expert-parallel training under fairseq (``--moe-expert-parallel-size P``).

* :mod:`.expert_parallel`: process groups, the per-process :class:`ExpertParallelState` carried
  by the expert parameters, gradient reduction, the global clipping norm, checkpoint-shard
  checks, the ``--moe-expert-parallel-size`` flag checks and the CPU torchrun launch (torch only).
* :mod:`.fairseq_patches`: :func:`install`, the one place that changes fairseq internals; its
  docstring lists each one and why.
"""

from .expert_parallel import (  # noqa: F401
    ExpertParallelError,
    ExpertParallelState,
    ShardMismatchError,
    check_args,
    check_shards_agree,
    configure_cpu_torchrun,
    configure_launch,
    parallel_size,
    reduce_expert_grads,
    setup,
    shard_parameters,
    shard_suffix,
    state_of,
)
from .fairseq_patches import FairseqPatchError, install  # noqa: F401  (fairseq imported on call)
