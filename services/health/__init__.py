"""Health service: node registration and liveness, execution observed state, health gates."""

from .service import HealthService

__all__ = ["HealthService"]
