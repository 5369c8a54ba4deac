"""Data-side pieces of the plugin: complexity tracking and ordering for the curriculum (§3.2)."""

from .curriculum import (  # noqa: F401
    SAMPLE_COMPLEXITY_KEY,
    SHUFFLE_MODES,
    ComplexityTracker,
    batch_complexity_spread,
    curriculum_order,
    sample_complexity,
    shuffle_in_buckets,
)
