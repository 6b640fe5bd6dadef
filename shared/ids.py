"""Deterministic ids: what redelivered work creates again is the same record, not a second one."""

from __future__ import annotations

import uuid


def derived_id(*parts: str) -> str:
    """A UUID derived from what caused the record (a submission, a deployment and a node, a predecessor)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "shoal:" + ":".join(parts)))


# A submission without a usable id is known by its stream sequence, as `seq-<N>`: no client-chosen id
# may start with it.
SEQ_PREFIX = "seq-"
