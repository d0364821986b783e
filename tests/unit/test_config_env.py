"""The OpenTelemetry environment as the SDKs read it, and every setting's own OTEL_EBPF_ form."""
from __future__ import annotations

import pytest

from otel_ebpf.cli import build_parser, main
from otel_ebpf.config import SETTINGS, ConfigError, load


def test_every_setting_has_a_flag_an_env_form_and_help(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for s in SETTINGS:
        assert s.env in text, f"{s.key}: no {s.env} in --help"
        flag = "--binary" if s.key == "binaries" else s.option
        assert flag in text, f"{s.key}: no {flag} in --help"
        assert s.help


@pytest.mark.parametrize("key,value,expected", [
    ("query_max_bytes", "2048", 2048), ("slow_threshold_ms", "150", 150.0), ("capture_raw_query", "true", True),
    ("targets", "postgres,mysql", ("postgres", "mysql")), ("include_ports", "5432,3306", (5432, 3306)),
    ("exclude_exe", "/opt/*", ("/opt/*",)), ("max_spans_burst", "5000", 5000), ("cache_dir", "off", "off"),
    ("resource_attributes", "a=1,b=x%20y", {"a": "1", "b": "x y"}),
])
def test_otel_ebpf_variables(key, value, expected):
    cfg = load({}, None, env={f"OTEL_EBPF_{key.upper()}": value})
    assert getattr(cfg, key) == expected


def test_binaries_variable():
    cfg = load({}, None, env={"OTEL_EBPF_BINARIES": "postgres=/opt/pg/bin/postgres,nginx=/opt/nginx"})
    assert cfg.binaries == {"postgres": ("/opt/pg/bin/postgres",), "nginx": ("/opt/nginx",)}


def test_flags_win_over_variables_which_win_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("slow_threshold_ms: 100\nquery_max_bytes: 256\n")
    cfg = load({"slow_threshold_ms": 300}, str(f), env={"OTEL_EBPF_SLOW_THRESHOLD_MS": "200",
                                                         "OTEL_EBPF_QUERY_MAX_BYTES": "512"})
    assert cfg.slow_threshold_ms == 300 and cfg.query_max_bytes == 512


@pytest.mark.parametrize("env,traces,metrics,logs", [
    ({}, "console", "none", "none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "otlp", "otlp", "otlp"),
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, "console", "otlp", "none"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "otlp", "none", "none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none",
      "OTEL_METRICS_EXPORTER": "console", "OTEL_LOGS_EXPORTER": "none"}, "none", "console", "none"),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_LOGS_EXPORTER": "console"}, "console", "none", "console"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp", "none", "none"),
])
def test_exporters_per_signal(env, traces, metrics, logs):
    cfg = load({}, None, env=env)
    assert (cfg.output, cfg.metrics_exporter, cfg.logs_exporter) == (traces, metrics, logs)


def test_output_flag_still_wins():
    cfg = load({"output": "console"}, None, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert cfg.output == "console" and cfg.metrics_exporter == "otlp"


@pytest.mark.parametrize("sampler,arg,ratio", [
    ("traceidratio", "0.25", 0.25), ("parentbased_traceidratio", "0.5", 0.5), ("always_off", None, 0.0),
    ("parentbased_always_off", None, 0.0), ("always_on", None, 1.0), ("parentbased_always_on", None, 1.0),
])
def test_samplers(sampler, arg, ratio):
    env = {"OTEL_TRACES_SAMPLER": sampler, **({"OTEL_TRACES_SAMPLER_ARG": arg} if arg else {})}
    cfg = load({}, None, env=env)
    assert cfg.traces_sampler == sampler and cfg.sample_ratio == ratio


def test_standard_resource_and_identity_variables():
    cfg = load({}, None, env={"OTEL_SERVICE_NAME": "edge-agent", "OTEL_SDK_DISABLED": "true",
                              "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod,host.name=node-7",
                              "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "64"})
    assert cfg.agent_service_name == "edge-agent" and cfg.sdk_disabled
    assert cfg.resource_attributes == {"deployment.environment.name": "prod", "host.name": "node-7"}
    assert cfg.attribute_value_length_limit == 64


@pytest.mark.parametrize("env,name", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ({"OTEL_EBPF_QUERY_MAX_BYTES": "1000"}, "query_max_bytes"),
    ({"OTEL_EBPF_INCLUDE_PORTS": "99999"}, "OTEL_EBPF_INCLUDE_PORTS"),
    ({"OTEL_EBPF_TARGETS": "postgres,oracle"}, "OTEL_EBPF_TARGETS"),
    ({"OTEL_SDK_DISABLED": "perhaps"}, "OTEL_SDK_DISABLED"),
])
def test_bad_variables_are_named(env, name):
    with pytest.raises(ConfigError, match=name):
        load({}, None, env=env)


def test_budget_defaults_keep_a_burst():
    cfg = load({}, None, env={})
    assert cfg.max_spans_per_second == 1000 and cfg.span_burst == 1000
    assert load({"max_spans_burst": 50}, None, env={}).span_burst == 50


def test_cli_reports_bad_variables_with_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("OTEL_EBPF_RINGBUF_PAGES", "3")
    assert main(["run"]) == 2
    assert "ringbuf_pages" in capsys.readouterr().err
