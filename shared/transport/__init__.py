"""The one wrapper around nats-py. Nothing outside this package imports `nats`."""

from ._auth import Credentials, servers
from ._bus import Bus, Expectation, Message, PubAck, StoredMessage, map_error
from ._consumer import (
    DEAD_ATTEMPTS,
    DEAD_CONSUMER,
    DEAD_ERROR,
    DEAD_SEQ,
    DEAD_SIZE,
    DEAD_SUBJECT,
    Consumer,
    ConsumerSpec,
    Delivery,
    retry_delay,
)
from ._kv import Entry, Kv, Watch, is_delete
from ._pull import Pull
from ._reader import OrderedReader, PullReader, StreamMessage, read_batches
from ._service import ApiRequest, ApiService, error_reply
from ._topology import BucketSpec, Source, StreamSpec

__all__ = [
    "Credentials",
    "servers",
    "DEAD_ATTEMPTS",
    "DEAD_CONSUMER",
    "DEAD_ERROR",
    "DEAD_SEQ",
    "DEAD_SIZE",
    "DEAD_SUBJECT",
    "StoredMessage",
    "ApiRequest",
    "ApiService",
    "BucketSpec",
    "Bus",
    "Consumer",
    "ConsumerSpec",
    "Delivery",
    "Entry",
    "Expectation",
    "Kv",
    "Message",
    "OrderedReader",
    "Pull",
    "PullReader",
    "PubAck",
    "Source",
    "StreamMessage",
    "StreamSpec",
    "Watch",
    "error_reply",
    "is_delete",
    "map_error",
    "read_batches",
    "retry_delay",
]
