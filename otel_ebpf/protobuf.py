"""OTLP protobuf pieces the hot path builds by hand: attribute KeyValues and the scope.

The SDK's own span path costs too much per span (see export.py); these helpers fill
`opentelemetry-proto` messages directly, reusing KeyValues that repeat.
"""
from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue

from . import __version__

SCOPE = InstrumentationScope(name="otel-ebpf", version=__version__)

_value_limit = 0  # OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: longer strings are cut (0 = no limit)


def set_value_length_limit(limit: int) -> None:
    """Cut string attribute values to `limit` characters from now on (0: no limit)."""
    global _value_limit
    if limit != _value_limit:
        _value_limit = max(0, int(limit))
        _KV_CACHE.clear()


def any_value(value: object) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    text = str(value)
    if _value_limit and len(text) > _value_limit:
        text = text[:_value_limit]
    return AnyValue(string_value=text)


def to_key_values(attrs: dict[str, object]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items() if v is not None]


_KV_CACHE: dict[tuple[str, type, object], KeyValue] = {}
# Bounded and cleared when full: a cached KeyValue costs about 1.1 KB (its own upb arena),
# and values such as URL paths with ids never repeat. At 8,192 entries the cache took 30
# minutes of a mixed load to fill, and the agent's RSS grew by 9 MB meanwhile; values that
# repeat come back within a few spans of a clear.
_KV_CACHE_MAX = 2048
# A client's port is new with nearly every connection: caching it would only churn the cache.
_KV_UNCACHED = frozenset({"client.port", "network.peer.port", "thread.id"})


def cached_key_values(attrs: dict[str, object]) -> list[KeyValue]:
    """KeyValues for span attributes, reusing messages for pairs seen before.

    Most span attributes repeat (system, database, query shape, ports): copying a
    ready KeyValue into a span costs a third of building a new one."""
    out = []
    cache = _KV_CACHE
    for k, v in attrs.items():
        if v is None:
            continue
        if k in _KV_UNCACHED or isinstance(v, (list, tuple, dict)):
            out.append(KeyValue(key=k, value=any_value(v)))
            continue
        key = (k, type(v), v)  # the type keeps True and 1 apart
        kv = cache.get(key)
        if kv is None:
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            kv = cache[key] = KeyValue(key=k, value=any_value(v))
        out.append(kv)
    return out


def kv_cache_size() -> int:
    return len(_KV_CACHE)
