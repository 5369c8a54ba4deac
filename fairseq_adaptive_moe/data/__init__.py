"""Data-side pieces of the plugin: complexity tracking and ordering for the curriculum (§3.2)."""

from .curriculum import (  # noqa: F401
    SAMPLE_COMPLEXITY_KEY,
    SHUFFLE_MODES,
    ComplexityTracker,
    balance_steps,
    batch_complexity_spread,
    batch_loads,
    curriculum_order,
    sample_complexity,
    shuffle_in_buckets,
    step_imbalance,
)
