"""Query service: a SQLite view of the EVENTS stream, serving paginated ListJobExecutions and friends."""

from .service import QueryService

__all__ = ["QueryService"]
