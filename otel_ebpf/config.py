"""One frozen Config from defaults, a YAML file, environment variables and CLI flags (in
that order: later ones win).

Every setting is declared once, in SETTINGS: its file key, its flag (`--query-max-bytes`),
its environment form (`OTEL_EBPF_QUERY_MAX_BYTES`), its type, default and help text.
The standard OpenTelemetry variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_SDK_DISABLED`, `OTEL_*_EXPORTER`, `OTEL_EXPORTER_OTLP_*_ENDPOINT`, samplers, batch
and metric intervals, `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`) are read as the SDKs read them
(`from_env`). An unknown key or a bad value is a ConfigError that names it; the CLI
exits with status 2.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from .targets.registry import TARGET_NAMES

KNOWN_TARGETS = TARGET_NAMES
EXPORTERS = ("otlp", "console", "none")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Setting:
    key: str
    help: str
    flag: bool = True  # has a --flag (every setting has a file key and an OTEL_EBPF_ variable)
    metavar: str = ""

    @property
    def env(self) -> str:
        return "OTEL_EBPF_" + self.key.upper()

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


@dataclass(frozen=True)
class Config:
    # what to watch
    targets: tuple[str, ...] = ()  # () = every target this build has
    binaries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # target -> extra paths
    include_exe: tuple[str, ...] = ()  # executable path globs; () = every one
    exclude_exe: tuple[str, ...] = ()
    include_ports: tuple[int, ...] = ()  # processes listening on these TCP ports
    exclude_ports: tuple[int, ...] = ()
    include_containers: tuple[str, ...] = ()  # container ids (or their prefix) or names
    exclude_containers: tuple[str, ...] = ()
    usdt_catalog: tuple[str, ...] = ()  # more usdt/*.yaml-style files
    # what to capture
    query_max_bytes: int = 1024
    tls_capture_bytes: int = 4096
    capture_raw_query: bool = False
    slow_threshold_ms: float = 500.0
    # sampling
    sample_ratio: float = 1.0
    traces_sampler: str = "parentbased_always_on"
    max_spans_per_second: int = 1000
    max_spans_burst: int = 0  # 0 = one second of max_spans_per_second
    # output
    output: str = "console"  # console | otlp | jsonl:PATH (traces)
    metrics_exporter: str = "none"  # otlp | console | none
    logs_exporter: str = "none"
    sdk_disabled: bool = False
    attribute_value_length_limit: int = 0  # 0 = no limit
    agent_service_name: str = "otel-ebpf"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    # the agent's own running
    health_addr: str = "127.0.0.1:9464"
    prometheus_addr: str = ""
    ringbuf_pages: int = 512
    queue_size: int = 65536
    batch_size: int = 2048
    export_delay_ms: int = 1000
    metric_interval_ms: int = 60000
    drain_interval_ms: int = 20
    rescan_interval_s: float = 5.0
    cache_dir: str = ""  # "" = /var/cache/otel-ebpf when writable; "off" = no cache
    log_level: str = "info"

    @property
    def slow_threshold_s(self) -> float:
        return self.slow_threshold_ms / 1000.0

    @property
    def span_burst(self) -> int:
        """Spans a quiet agent lets through at once: one second of the budget by default."""
        return self.max_spans_burst or self.max_spans_per_second

    @property
    def traces_exporter(self) -> str:
        return "none" if self.output == "none" else ("otlp" if self.output == "otlp" else "console")


SETTINGS: tuple[Setting, ...] = (
    Setting("targets", "comma-separated targets to run (default: all of them)", metavar="LIST"),
    Setting("binaries", "also attach TARGET to this binary (repeatable)", flag=False),
    Setting("include_exe", "watch only executables matching these path globs (comma-separated)", metavar="GLOBS"),
    Setting("exclude_exe", "never watch executables matching these path globs", metavar="GLOBS"),
    Setting("include_ports", "watch only processes listening on these TCP ports", metavar="PORTS"),
    Setting("exclude_ports", "never watch processes listening on these TCP ports", metavar="PORTS"),
    Setting("include_containers", "watch only processes in these containers (id, id prefix or name)",
            metavar="LIST"),
    Setting("exclude_containers", "never watch processes in these containers", metavar="LIST"),
    Setting("usdt_catalog", "more USDT catalog files (YAML, as in usdt/) to load", metavar="PATHS"),
    Setting("query_max_bytes", "bytes of query text the kernel copies (power of two, 64-8192; default 1024)",
            metavar="N"),
    Setting("tls_capture_bytes", "plaintext bytes copied per SSL_read/SSL_write (power of two, 64-16384)",
            metavar="N"),
    Setting("capture_raw_query", "export query text WITH its literals (may expose secrets)"),
    Setting("slow_threshold_ms", "slower operations are always kept and logged (default 500)", metavar="MS"),
    Setting("sample_ratio", "fraction of fast, successful operations sent as spans (default 1)", metavar="R"),
    Setting("traces_sampler", "as OTEL_TRACES_SAMPLER: parentbased_always_on (default), traceidratio, ...",
            metavar="NAME"),
    Setting("max_spans_per_second", "above this rate the kernel samples spans down; metrics stay exact "
            "(0 = no limit; default 1000)", metavar="N"),
    Setting("max_spans_burst", "spans let through at once after a quiet time (default: one second's worth)",
            metavar="N"),
    Setting("output", "where spans go: otlp | console | jsonl:PATH | none (default: otlp when an OTLP "
            "endpoint is set, else console)", metavar="OUT"),
    Setting("metrics_exporter", "otlp | console | none (as OTEL_METRICS_EXPORTER)", metavar="NAME"),
    Setting("logs_exporter", "otlp | console | none (as OTEL_LOGS_EXPORTER)", metavar="NAME"),
    Setting("sdk_disabled", "export nothing and attach nothing (as OTEL_SDK_DISABLED)"),
    Setting("attribute_value_length_limit", "cut longer string attribute values (0 = no limit)", metavar="N"),
    Setting("agent_service_name", "service.name of the agent's own telemetry (as OTEL_SERVICE_NAME)",
            metavar="NAME"),
    Setting("resource_attributes", "key=value,... added to every Resource (as OTEL_RESOURCE_ATTRIBUTES)",
            metavar="KV"),
    Setting("health_addr", "HOST:PORT of /healthz and /readyz (default 127.0.0.1:9464)", metavar="ADDR"),
    Setting("prometheus_addr", "HOST:PORT serving /metrics (default off)", metavar="ADDR"),
    Setting("ringbuf_pages", "ring buffer size per binary, in 4 KiB pages (power of two)", metavar="N"),
    Setting("queue_size", "spans waiting for export; more are dropped and counted", metavar="N"),
    Setting("batch_size", "spans per export request", metavar="N"),
    Setting("export_delay_ms", "longest wait before a partial batch is exported", metavar="MS"),
    Setting("metric_interval_ms", "how often metrics are exported", metavar="MS"),
    Setting("drain_interval_ms", "how often ring buffers are drained while records come", metavar="MS"),
    Setting("rescan_interval_s", "how often to look for new or replaced binaries", metavar="S"),
    Setting("cache_dir", "where ELF facts are cached across starts ('off': no cache)", metavar="DIR"),
    Setting("log_level", "debug | info | warning | error", metavar="LEVEL"),
)
SETTING = {s.key: s for s in SETTINGS}
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
assert set(SETTING) == set(_FIELDS), "every Config field is a Setting"


def _default(key: str) -> Any:
    f = _FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _items(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if str(t).strip()]


def parse_key_values(text: str, what: str) -> dict[str, str]:
    """`k1=v1,k2=v2` with percent-encoded values, as OTEL_RESOURCE_ATTRIBUTES is written."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: {item.strip()!r} is not key=value")
        out[key.strip()] = urllib.parse.unquote(value.strip())
    return out


def _check(key: str, value: Any) -> Any:
    """Coerce one value to its field's type, or raise ConfigError naming the key."""
    default = _default(key)
    try:
        if key == "targets":
            names = tuple(_items(value))
            unknown = [t for t in names if t not in KNOWN_TARGETS]
            if unknown or not names:
                raise ConfigError(f"{key}: unknown target(s) {unknown or names}; known: {', '.join(KNOWN_TARGETS)}")
            return names
        if key == "binaries":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping of target -> list of paths")
            out = {}
            for target, paths in value.items():
                if target not in KNOWN_TARGETS:
                    raise ConfigError(f"binaries.{target}: unknown target; known: {', '.join(KNOWN_TARGETS)}")
                out[target] = (paths,) if isinstance(paths, str) else tuple(str(p) for p in paths)
            return out
        if key == "resource_attributes":
            if isinstance(value, Mapping):
                return {str(k): str(v) for k, v in value.items()}
            return parse_key_values(str(value), key)
        if key in ("include_ports", "exclude_ports"):
            ports = tuple(int(p) for p in _items(value))
            if any(not 0 < p < 65536 for p in ports):
                raise ValueError(value)
            return ports
        if isinstance(default, tuple):
            return tuple(_items(value))
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value).strip()
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: bad value {value!r} (expected {type(default).__name__})") from None


def _validate(cfg: Config) -> Config:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{key}: {getattr(cfg, key)!r} {why}")

    q = cfg.query_max_bytes
    if q < 64 or q > 8192 or q & (q - 1):
        raise bad("query_max_bytes", "must be a power of two from 64 to 8192")
    t = cfg.tls_capture_bytes
    if t < 64 or t > 16384 or t & (t - 1):
        raise bad("tls_capture_bytes", "must be a power of two from 64 to 16384")
    if not 0.0 <= cfg.sample_ratio <= 1.0:
        raise bad("sample_ratio", "must be between 0 and 1")
    if cfg.traces_sampler not in SAMPLERS:
        raise bad("traces_sampler", f"must be one of {', '.join(SAMPLERS)}")
    for key in ("max_spans_per_second", "max_spans_burst", "attribute_value_length_limit"):
        if getattr(cfg, key) < 0:
            raise bad(key, "must be >= 0")
    if cfg.slow_threshold_ms < 0:
        raise bad("slow_threshold_ms", "must be >= 0")
    p = cfg.ringbuf_pages
    if p < 1 or p & (p - 1):
        raise bad("ringbuf_pages", "must be a power of two")
    for key in ("queue_size", "batch_size", "export_delay_ms", "metric_interval_ms", "drain_interval_ms"):
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be > 0")
    if cfg.rescan_interval_s <= 0:
        raise bad("rescan_interval_s", "must be > 0")
    for key in ("health_addr", "prometheus_addr"):
        value = getattr(cfg, key)
        if value and not _is_host_port(value):
            raise bad(key, "must be HOST:PORT")
    if not (cfg.output in ("console", "otlp", "none") or (cfg.output.startswith("jsonl:") and len(cfg.output) > 6)):
        raise bad("output", "must be console, otlp, none or jsonl:PATH")
    for key in ("metrics_exporter", "logs_exporter"):
        if getattr(cfg, key) not in EXPORTERS:
            raise bad(key, f"must be one of {', '.join(EXPORTERS)}")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise bad("log_level", "must be debug, info, warning or error")
    return cfg


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 <= int(port) < 65536


def from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    out = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in _FIELDS:
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(_FIELDS))})")
        out[norm] = _check(norm, value)
    return out


def _signal_exporter(env: Mapping[str, str], signal: str, default: str) -> str | None:
    """OTEL_<SIGNAL>_EXPORTER, else otlp when an endpoint for the signal is set, else None."""
    value = env.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if value:
        first = value.split(",")[0].strip()  # several exporters: the first one we know
        if first not in EXPORTERS:
            raise ConfigError(f"OTEL_{signal}_EXPORTER: {value!r} must be one of {', '.join(EXPORTERS)}")
        return first
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"):
        return "otlp"
    return None


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from the standard OTEL_* variables, then from OTEL_EBPF_* (which win)."""
    out: dict[str, Any] = {}

    def take(var: str, key: str, convert: Callable[[str], Any] | None = None) -> None:
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            return
        try:
            out[key] = _check(key, convert(raw) if convert else raw)
        except ConfigError as exc:
            raise ConfigError(f"{var}: {exc}") from None

    traces = _signal_exporter(env, "TRACES", "console")
    if traces is not None:
        out["output"] = traces
    for signal in ("METRICS", "LOGS"):
        chosen = _signal_exporter(env, signal, "none")
        if chosen is not None:
            out[f"{signal.lower()}_exporter"] = chosen
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler:
        if sampler not in SAMPLERS:
            raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} must be one of {', '.join(SAMPLERS)}")
        out["traces_sampler"] = sampler
        if sampler.endswith("traceidratio"):
            take("OTEL_TRACES_SAMPLER_ARG", "sample_ratio")
        elif sampler.endswith("always_off"):
            out["sample_ratio"] = 0.0
    take("OTEL_SDK_DISABLED", "sdk_disabled")
    take("OTEL_SERVICE_NAME", "agent_service_name")
    take("OTEL_RESOURCE_ATTRIBUTES", "resource_attributes")
    take("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "attribute_value_length_limit")
    take("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "attribute_value_length_limit")
    for var, key in (("OTEL_BSP_MAX_QUEUE_SIZE", "queue_size"),
                     ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "batch_size"),
                     ("OTEL_BSP_SCHEDULE_DELAY", "export_delay_ms"),
                     ("OTEL_METRIC_EXPORT_INTERVAL", "metric_interval_ms")):
        take(var, key)
    for setting in SETTINGS:
        if setting.key != "binaries":
            take(setting.env, setting.key)
    if env.get("OTEL_EBPF_BINARIES"):
        out["binaries"] = _check("binaries", parse_binaries(env["OTEL_EBPF_BINARIES"].split(","), "OTEL_EBPF_BINARIES"))
    return out


def parse_binaries(items: list[str], what: str) -> dict[str, list[str]]:
    binaries: dict[str, list[str]] = {}
    for item in items:
        target, sep, path = item.strip().partition("=")
        if not sep or not path:
            raise ConfigError(f"{what} {item!r}: expected TARGET=PATH")
        binaries.setdefault(target, []).append(path)
    return binaries


def load(cli: Mapping[str, Any] | None = None, config_file: str | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file, then environment variables, then CLI flags (None = not given)."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_file(config_file))
    merged.update(from_env(os.environ if env is None else env))
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown option {key!r}")
        merged[key] = _check(key, value)
    return _validate(Config(**merged))


def settings_markdown() -> str:
    """The settings table of docs/configuration.md (a unit test keeps the two equal)."""
    rows = ["| file key | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = _default(s.key)
        shown = {(): "all" if s.key == "targets" else "–", "": "–"}.get(default, default) \
            if not isinstance(default, Mapping) else "–"
        if isinstance(default, bool):
            shown = str(default).lower()
        flag = f"`{s.option}`" if s.flag else ("`--binary TARGET=PATH`" if s.key == "binaries" else "–")
        text = s.help.replace("|", "\\|")
        rows.append(f"| `{s.key}` | {flag} | `{s.env}` | {shown} | {text} |")
    return "\n".join(rows) + "\n"
