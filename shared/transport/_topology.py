"""Plain descriptions of streams and buckets, turned into client-library configs here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nats.js import api


@dataclass(frozen=True)
class Source:
    """Copy another stream's messages into this one (server side), renaming subjects src -> dest."""

    stream: str
    src: str
    dest: str


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...] = ()
    retention: Literal["limits", "workqueue"] = "limits"
    max_age: float = 0.0  # seconds; 0 = forever
    max_bytes: int = -1
    max_msgs: int = -1
    duplicate_window: float = 120.0
    sources: tuple[Source, ...] = field(default_factory=tuple)
    description: str = ""
    max_msgs_per_subject: int = -1
    max_msg_size: int = -1  # bytes of one message; -1: the server's max_payload
    replicas: int = 1
    msg_ttl: bool = False  # honour a message's own Nats-TTL header (it is removed once that has passed)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    history: int = 1
    ttl: float = 0.0  # seconds; 0 = forever
    description: str = ""
    replicas: int = 1
    msg_ttl: bool = False  # a write may carry its own Nats-TTL (`Kv.delete(ttl=...)`: a marker that goes away)


def stream_config(spec: StreamSpec) -> api.StreamConfig:
    return api.StreamConfig(
        name=spec.name,
        description=spec.description or None,
        subjects=list(spec.subjects) or None,
        retention=api.RetentionPolicy.WORK_QUEUE if spec.retention == "workqueue" else api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=spec.max_age or None,
        max_bytes=spec.max_bytes,
        max_msgs=spec.max_msgs,
        max_msgs_per_subject=spec.max_msgs_per_subject,
        max_msg_size=spec.max_msg_size,
        num_replicas=spec.replicas,
        duplicate_window=spec.duplicate_window,
        allow_msg_ttl=spec.msg_ttl or None,
        sources=[
            api.StreamSource(
                name=s.stream, subject_transforms=[api.SubjectTransform(src=s.src, dest=s.dest)]
            )
            for s in spec.sources
        ]
        or None,
    )


def bucket_config(spec: BucketSpec) -> api.KeyValueConfig:
    return api.KeyValueConfig(
        bucket=spec.name,
        description=spec.description or None,
        history=spec.history,
        ttl=spec.ttl or None,
        storage=api.StorageType.FILE,
        direct=True,  # reads served by direct get, cheaper than the stream API
        replicas=spec.replicas,
    )
