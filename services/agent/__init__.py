"""Node agent: registers, heartbeats, runs assigned executions and reports their states.

`AgentService` is imported on first use: the shim (`python -m services.agent.shim`), one of which
supervises every running command, then loads only what it needs, not NATS and the rest of the agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import AgentService

__all__ = ["AgentService"]


def __getattr__(name: str) -> Any:
    if name == "AgentService":
        from .service import AgentService

        return AgentService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
