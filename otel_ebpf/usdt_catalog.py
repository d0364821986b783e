"""The USDT catalog: start/done probe pairs described as data (usdt/catalog/*.yaml and
files named by `usdt_catalog`), turned by the `usdt` target into spans and exact kernel
histograms without a line of Python or C per provider.

A file names the binaries it applies to and its pairs:

    binaries:
      paths: [/usr/bin/python3.1*]      # globs of binary files
      processes: [python3*]             # or executable names of running processes
      provider: python                  # default provider of the pairs
      resource: process                 # or parent: a child's spans go to a parent running
                                        # the same executable; or {symbol: NAME}: a global
                                        # of the binary holds the pid (PostmasterPid)
    pairs:
      - name: cpython.gc                # unique across the catalog
        start: gc__start
        done: gc__done
        key: thread                     # or {arg: N}: the argument both probes share
        attributes:                     # read from a probe's arguments (1-based)
          cpython.gc.generation: {probe: start, arg: 1, type: int}
          otel_ebpf.python.module: {probe: start, arg: 1, type: string}
          otel_ebpf.mode: {probe: start, arg: 6, type: int, values: {1: AccessShareLock}}
        metric: {name: otel_ebpf.cpython.gc.duration, description: ..., attributes: [cpython.gc.generation]}
        span: {name: "gc {cpython.gc.generation}", kind: internal, min_duration_ms: 0}   # or false

Every mistake stops the agent at start with the file and line (CatalogError); a probe or
argument a binary does not have is checked against each binary when it is attached.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .contract import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER

MAX_PAIRS_PER_BINARY = 8  # probes/usdt.c defines the functions of at most this many pairs
MAX_SLOTS = 6  # integer or string attributes per pair
MAX_STRINGS = 2  # string attributes per pair (each up to STR_MAX bytes)
MAX_METRIC_ATTRIBUTES = 2  # integer attributes in a histogram key (24 bits each)
KINDS = {"internal": KIND_INTERNAL, "server": KIND_SERVER, "client": KIND_CLIENT}


class CatalogError(Exception):
    """A catalog file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    probe: str  # "start" | "done"
    arg: int  # 1-based
    type: str  # "int" | "string"
    values: dict[int, str] = field(default_factory=dict)  # int -> name (an enum)
    slot: int = 0  # where the kernel keeps it (args[] for ints, str[] for strings)

    def value(self, raw: int | str) -> object:
        if self.type == "int" and self.values:
            return self.values.get(int(raw), str(raw))
        return raw


@dataclass(frozen=True)
class Pair:
    name: str
    provider: str
    start: str
    done: str
    key_arg: int  # 0: thread
    attributes: tuple[AttributeSpec, ...]
    metric: str = ""
    metric_description: str = ""
    metric_attributes: tuple[str, ...] = ()
    span: bool = False
    span_name: str = ""
    span_kind: int = KIND_INTERNAL
    min_duration_ms: float = 0.0
    source: str = ""  # file:line

    def describe(self) -> str:
        parts = []
        if self.metric:
            parts.append(f"histogram {self.metric}" + (f" by {', '.join(self.metric_attributes)}"
                                                          if self.metric_attributes else ""))
        if self.span:
            parts.append(f"spans \"{self.span_name}\"" + (f" of {self.min_duration_ms:g} ms or more"
                                                           if self.min_duration_ms else ""))
        return "; ".join(parts) or "nothing (no metric, no span)"


@dataclass(frozen=True)
class BinarySet:
    paths: tuple[str, ...]
    processes: tuple[str, ...]
    resource: str  # "process" | "parent" | "symbol"
    pairs: tuple[Pair, ...]
    source: str
    resource_symbol: str = ""  # with resource "symbol": the u32 global holding the pid

    def candidate_paths(self) -> list[str]:
        """Files the path globs find that are ELF binaries (python3.11-config is a script)."""
        return sorted({p for pattern in self.paths for p in glob.glob(pattern) if _is_elf(p)})

    def matches_exe(self, exe: str) -> bool:
        import fnmatch
        base = os.path.basename(exe)
        return any(fnmatch.fnmatch(base, g) for g in self.processes) or \
            any(fnmatch.fnmatch(exe, g) for g in self.paths)


@dataclass(frozen=True)
class Catalog:
    sets: tuple[BinarySet, ...]
    files: tuple[str, ...]

    @property
    def pairs(self) -> list[Pair]:
        return [p for s in self.sets for p in s.pairs]


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return os.path.isfile(path) and fh.read(4) == b"\x7fELF"
    except OSError:
        return False


class _Loader(yaml.SafeLoader):
    """YAML with line numbers: every mapping remembers where it started."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


class _LineDict(dict):
    line = 0


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def shipped_files() -> list[str]:
    directory = resources.files("otel_ebpf.usdt") / "catalog"
    try:
        return sorted(str(directory / name) for name in os.listdir(str(directory)) if name.endswith(".yaml"))
    except OSError:
        return []


def load_catalog(extra: tuple[str, ...] | list[str] = ()) -> Catalog:
    """The shipped catalog and `extra` files; CatalogError names the file and line."""
    files = [*shipped_files(), *extra]
    sets: list[BinarySet] = []
    seen: dict[str, str] = {}
    for path in files:
        binary_set = load_file(path)
        for pair in binary_set.pairs:
            if pair.name in seen:
                raise CatalogError(f"{pair.source}: pair name {pair.name!r} is also used at {seen[pair.name]}")
            seen[pair.name] = pair.source
        sets.append(binary_set)
    return Catalog(tuple(sets), tuple(files))


def load_file(path: str) -> BinarySet:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise CatalogError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}:1: expected a mapping with `binaries` and `pairs`")
    _only(path, data, {"binaries", "pairs"}, "the file")
    binaries = data.get("binaries")
    if not isinstance(binaries, dict):
        raise CatalogError(f"{path}:{_line(data)}: `binaries` must be a mapping (paths, processes, provider)")
    _only(path, binaries, {"paths", "processes", "provider", "resource"}, "binaries")
    paths = _strings(path, binaries, "paths")
    processes = _strings(path, binaries, "processes")
    if not paths and not processes:
        raise CatalogError(f"{path}:{_line(binaries)}: `binaries` needs `paths` or `processes`")
    resource = binaries.get("resource", "process")
    resource_symbol = ""
    if isinstance(resource, dict) and set(resource) == {"symbol"} and isinstance(resource["symbol"], str):
        resource, resource_symbol = "symbol", resource["symbol"]
    elif resource not in ("process", "parent"):
        raise CatalogError(f"{path}:{_line(binaries)}: resource must be `process`, `parent` or {{symbol: NAME}}")
    provider = binaries.get("provider", "")
    raw_pairs = data.get("pairs")
    if not isinstance(raw_pairs, list) or not raw_pairs:
        raise CatalogError(f"{path}:{_line(data)}: `pairs` must be a non-empty list")
    if len(raw_pairs) > MAX_PAIRS_PER_BINARY:
        raise CatalogError(f"{path}:{_line(data)}: at most {MAX_PAIRS_PER_BINARY} pairs per file")
    pairs = tuple(_pair(path, raw, provider) for raw in raw_pairs)
    return BinarySet(tuple(paths), tuple(processes), resource, pairs, f"{path}:{_line(binaries)}", resource_symbol)


def _pair(path: str, raw: Any, default_provider: str) -> Pair:
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: each pair must be a mapping")
    where = f"{path}:{_line(raw)}"
    _only(path, raw, {"name", "provider", "start", "done", "key", "attributes", "metric", "span"}, "a pair")
    for key in ("name", "start", "done"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise CatalogError(f"{where}: `{key}` is required (a string)")
    provider = raw.get("provider", default_provider)
    if not isinstance(provider, str) or not provider:
        raise CatalogError(f"{where}: no provider (set `provider` in the pair or in `binaries`)")
    key = raw.get("key", "thread")
    if key == "thread":
        key_arg = 0
    elif isinstance(key, dict) and set(key) == {"arg"} and _arg_number(key["arg"]):
        key_arg = int(key["arg"])
    else:
        raise CatalogError(f"{where}: key must be `thread` or {{arg: N}} with N from 1 to 12")
    attributes = _attributes(path, raw.get("attributes") or {}, where)
    metric, description, metric_attrs = _metric(path, raw.get("metric"), attributes, where)
    span, span_name, kind, min_ms = _span(path, raw.get("span", False), raw["name"], where)
    if not metric and not span:
        raise CatalogError(f"{where}: pair {raw['name']!r} has neither a metric nor spans")
    return Pair(raw["name"], provider, raw["start"], raw["done"], key_arg, attributes, metric, description,
                metric_attrs, span, span_name, kind, min_ms, where)


def _attributes(path: str, raw: Any, where: str) -> tuple[AttributeSpec, ...]:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: `attributes` must map names to {{probe, arg, type}}")
    if len(raw) > MAX_SLOTS:
        raise CatalogError(f"{where}: at most {MAX_SLOTS} attributes")
    out: list[AttributeSpec] = []
    ints = strings = 0
    for name, spec in raw.items():
        at = f"{path}:{_line(spec) if isinstance(spec, dict) else _line(raw)}"
        if not isinstance(spec, dict):
            raise CatalogError(f"{at}: attribute {name!r} must be {{probe, arg, type}}")
        _only(path, spec, {"probe", "arg", "type", "values"}, f"attribute {name!r}")
        probe = spec.get("probe", "start")
        kind = spec.get("type", "int")
        if probe not in ("start", "done"):
            raise CatalogError(f"{at}: attribute {name!r}: probe must be `start` or `done`")
        if kind not in ("int", "string"):
            raise CatalogError(f"{at}: attribute {name!r}: type must be `int` or `string`")
        if not _arg_number(spec.get("arg")):
            raise CatalogError(f"{at}: attribute {name!r}: arg must be a number from 1 to 12")
        values = spec.get("values") or {}
        if not isinstance(values, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in values.items()):
            raise CatalogError(f"{at}: attribute {name!r}: values must map integers to names")
        if kind == "string":
            if strings >= MAX_STRINGS:
                raise CatalogError(f"{at}: at most {MAX_STRINGS} string attributes per pair")
            slot, strings = strings, strings + 1
        else:
            slot, ints = ints, ints + 1
        out.append(AttributeSpec(str(name), probe, int(spec["arg"]), kind, dict(values), slot))
    return tuple(out)


def _metric(path: str, raw: Any, attributes: tuple[AttributeSpec, ...], where: str) -> tuple[str, str, tuple[str, ...]]:
    if raw in (None, False):
        return "", "", ()
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise CatalogError(f"{where}: `metric` must be a mapping with a `name`")
    _only(path, raw, {"name", "description", "attributes"}, "metric")
    names = tuple(raw.get("attributes") or ())
    by_name = {a.name: a for a in attributes}
    for name in names:
        if name not in by_name:
            raise CatalogError(f"{path}:{_line(raw)}: metric attribute {name!r} is not one of the pair's attributes")
        if by_name[name].type != "int":
            raise CatalogError(f"{path}:{_line(raw)}: metric attribute {name!r} must be an int (low cardinality)")
    if len(names) > MAX_METRIC_ATTRIBUTES:
        raise CatalogError(f"{path}:{_line(raw)}: at most {MAX_METRIC_ATTRIBUTES} metric attributes")
    return raw["name"], str(raw.get("description", "")), names


def _span(path: str, raw: Any, pair_name: str, where: str) -> tuple[bool, str, int, float]:
    if raw in (None, False):
        return False, "", KIND_INTERNAL, 0.0
    if raw is True:
        return True, pair_name, KIND_INTERNAL, 0.0
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: `span` must be false, true or a mapping (name, kind, min_duration_ms)")
    _only(path, raw, {"name", "kind", "min_duration_ms"}, "span")
    kind = raw.get("kind", "internal")
    if kind not in KINDS:
        raise CatalogError(f"{path}:{_line(raw)}: span kind must be one of {', '.join(KINDS)}")
    try:
        min_ms = float(raw.get("min_duration_ms", 0))
    except (TypeError, ValueError):
        raise CatalogError(f"{path}:{_line(raw)}: min_duration_ms must be a number") from None
    return True, str(raw.get("name", pair_name)), KINDS[kind], min_ms


def _only(path: str, mapping: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise CatalogError(f"{path}:{_line(mapping)}: unknown key(s) {', '.join(unknown)} in {what} "
                           f"(known: {', '.join(sorted(allowed))})")


def _strings(path: str, mapping: dict, key: str) -> list[str]:
    value = mapping.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{path}:{_line(mapping)}: `{key}` must be a list of strings")
    return value


def _arg_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 12


def _line(mapping: Any) -> int:
    return getattr(mapping, "line", 0)
