"""The HTTP gateway: shoal's NATS API over HTTP, its OpenAPI document, event streams and the dashboard."""

from .service import GatewayService

__all__ = ["GatewayService"]
