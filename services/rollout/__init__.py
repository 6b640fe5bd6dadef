"""Rollout service: places executions wave by wave, gates on health, enforces the failure budget, rolls back."""

from .service import RolloutService

__all__ = ["RolloutService"]
