"""The plugin's user tools as library modules; ``fairseq_adaptive_moe.cli`` holds their commands.

* :mod:`.bench`: the layer bench, the paper's Table 1 for several implementations
  (``adaptive-moe-bench``; torch only).
* :mod:`.routing`: per-token routing analysis of a checkpoint (``adaptive-moe-routing``).
* :mod:`.upcycle`: a dense transformer or BART checkpoint -> an adaptive MoE one
  (``adaptive-moe-upcycle``).
* :mod:`.consolidate`: merge or re-shard expert-parallel checkpoint shards
  (``adaptive-moe-consolidate``; torch only).

Each raises its own error type (``BadFlag``, ``InputError``, ``UpcycleError``,
``ConsolidateError``) with a one-line message; only the commands turn them into an exit status.
Importing this package imports nothing else.
"""
