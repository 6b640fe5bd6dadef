"""Node agent: registers, heartbeats, runs assigned executions and reports their states."""

from .service import AgentService

__all__ = ["AgentService"]
