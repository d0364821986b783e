"""Hold exported attributes against the semantic conventions registry, as the maintained
`opentelemetry-semantic-conventions` package names it (stable and incubating modules)."""
from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from opentelemetry.semconv import attributes as stable
from opentelemetry.semconv._incubating import attributes as incubating

# Attributes the agent exports whose registered type is not a string (the package names
# attributes but does not carry their types): they must go out as these Python types.
TYPED = {
    "server.port": int, "client.port": int, "http.response.status_code": int, "process.pid": int,
    "thread.id": int, "cpython.gc.generation": int, "db.response.returned_rows": int,
}


@cache
def registered_names() -> frozenset[str]:
    names: set[str] = set()
    for package in (stable, incubating):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            names.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and "." in v)
    return frozenset(names)


def assert_registered(spans) -> None:
    """Every span and resource attribute is registered, with its registered type (an int
    attribute goes out as an int); keys of our own use the otel_ebpf. prefix."""
    registered = registered_names()
    for s in spans:
        for key, value in {**s.attributes, **s.resource}.items():
            if key.startswith("otel_ebpf."):
                continue
            assert key in registered, f"{key} is not a registered attribute"
            if key in TYPED:
                assert isinstance(value, TYPED[key]) and not isinstance(value, bool), \
                    f"{key}={value!r} should be {TYPED[key].__name__}"
            else:
                assert isinstance(value, (str, int, float, bool, list)), f"{key}={value!r}"
