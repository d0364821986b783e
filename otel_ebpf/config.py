"""One frozen Config from defaults, a YAML file, OTEL_* variables and CLI flags (in that order).

Every key is checked: an unknown key or a bad value is a ConfigError that names
it, and the CLI exits with status 2.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

KNOWN_TARGETS = ("postgres", "mysql", "nginx", "openssl")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    output: str = "console"  # console | otlp | jsonl:PATH
    targets: tuple[str, ...] = ()  # () = every target this build has
    binaries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # target -> extra paths
    health_addr: str = "127.0.0.1:9464"
    prometheus_addr: str = ""  # "" = off
    query_max_bytes: int = 1024  # query text copied by the kernel (power of two)
    tls_capture_bytes: int = 4096  # plaintext copied per SSL_read/SSL_write call (power of two)
    slow_threshold_ms: float = 500.0  # slower operations are always kept and logged
    sample_ratio: float = 1.0  # fraction of (fast, successful) operations sent as spans
    # Above this many operations per second the agent lowers the sampling ratio so that
    # about this many spans/s leave (slow and failed ones always do; metrics stay exact).
    # 0 = no limit. Each span costs the agent about 15 us of CPU that, on a busy host, the
    # watched server would have used: 1,000/s keeps that near 2 % of a core.
    max_spans_per_second: int = 1000
    capture_raw_query: bool = False  # opt-in: export query text with its literals
    ringbuf_pages: int = 512
    queue_size: int = 65536  # spans waiting for export; more are dropped and counted
    batch_size: int = 2048
    export_delay_ms: int = 1000
    metric_interval_ms: int = 60000
    drain_interval_ms: int = 20  # ring buffers are drained in batches this often
    rescan_interval_s: float = 5.0  # how often to look for new/replaced binaries
    agent_service_name: str = "otel-ebpf"
    log_level: str = "info"

    @property
    def slow_threshold_s(self) -> float:
        return self.slow_threshold_ms / 1000.0


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _check(key: str, value: Any) -> Any:
    """Coerce one value to its field's type, or raise ConfigError naming the key."""
    default = _FIELDS[key].default
    try:
        if key == "targets":
            items = value.split(",") if isinstance(value, str) else list(value)
            names = tuple(t.strip() for t in items if str(t).strip())
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
        return str(value)
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
    if cfg.max_spans_per_second < 0:
        raise bad("max_spans_per_second", "must be >= 0 (0 = no limit)")
    if cfg.slow_threshold_ms < 0:
        raise bad("slow_threshold_ms", "must be >= 0")
    p = cfg.ringbuf_pages
    if p < 1 or p & (p - 1):
        raise bad("ringbuf_pages", "must be a power of two")
    for key in ("queue_size", "batch_size", "export_delay_ms", "metric_interval_ms", "drain_interval_ms"):
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be > 0")
    for key in ("health_addr", "prometheus_addr"):
        value = getattr(cfg, key)
        if value and not _is_host_port(value):
            raise bad(key, "must be HOST:PORT")
    if not (cfg.output in ("console", "otlp") or (cfg.output.startswith("jsonl:") and len(cfg.output) > 6)):
        raise bad("output", "must be console, otlp or jsonl:PATH")
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


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        out["output"] = "otlp"
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        out["sample_ratio"] = _check("sample_ratio", arg)
    elif sampler in ("always_off", "parentbased_always_off"):
        out["sample_ratio"] = 0.0
    for var, key in (("OTEL_BSP_MAX_QUEUE_SIZE", "queue_size"),
                     ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "batch_size"),
                     ("OTEL_BSP_SCHEDULE_DELAY", "export_delay_ms"),
                     ("OTEL_METRIC_EXPORT_INTERVAL", "metric_interval_ms")):
        if env.get(var):
            try:
                out[key] = _check(key, env[var])
            except ConfigError as exc:
                raise ConfigError(f"{var}: {exc}") from None
    return out


def load(cli: Mapping[str, Any] | None = None, config_file: str | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file, then OTEL_* variables, then CLI flags (None = not given)."""
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
