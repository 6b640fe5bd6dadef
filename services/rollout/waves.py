"""Wave sizes of a rollout (the arithmetic lives in shared/waves.py: a dry run makes the same waves)."""

from shared.waves import (
    DEFAULT_CANARY_PERCENT,
    DEFAULT_MAX_PARALLEL,
    canary_size,
    percent_of,
    plan_waves,
    wave_at,
    wave_edges,
    wave_of,
    wave_size,
)

__all__ = ["DEFAULT_CANARY_PERCENT", "DEFAULT_MAX_PARALLEL", "canary_size", "percent_of", "plan_waves", "wave_at",
           "wave_edges", "wave_of", "wave_size"]
