"""Scheduler service: validates and versions submitted jobs, selects nodes, hands plans to the rollout."""

from .service import SchedulerService

__all__ = ["SchedulerService"]
