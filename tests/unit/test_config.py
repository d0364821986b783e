import pytest

from otel_ebpf.cli import main
from otel_ebpf.config import ConfigError, load


def test_defaults_console_without_endpoint():
    cfg = load({}, None, env={})
    assert cfg.output == "console" and cfg.health_addr == "127.0.0.1:9464" and cfg.prometheus_addr == ""
    assert cfg.capture_raw_query is False and cfg.sample_ratio == 1.0


def test_env_selects_otlp_and_sampler():
    cfg = load({}, None, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_TRACES_SAMPLER": "traceidratio",
                              "OTEL_TRACES_SAMPLER_ARG": "0.1", "OTEL_BSP_MAX_QUEUE_SIZE": "100"})
    assert cfg.output == "otlp" and cfg.sample_ratio == 0.1 and cfg.queue_size == 100


def test_precedence_file_env_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("slow_threshold_ms: 100\nsample-ratio: 0.5\ntargets: [postgres]\nbinaries: {postgres: /x/postgres}\n")
    cfg = load({"slow_threshold_ms": 250}, str(f), env={})
    assert cfg.slow_threshold_ms == 250 and cfg.sample_ratio == 0.5 and cfg.targets == ("postgres",)
    assert cfg.binaries == {"postgres": ("/x/postgres",)}


@pytest.mark.parametrize("text, key", [
    ("slow_treshold_ms: 5\n", "slow_treshold_ms"),
    ("query_max_bytes: 1000\n", "query_max_bytes"),
    ("sample_ratio: 2\n", "sample_ratio"),
    ("sample_ratio: lots\n", "sample_ratio"),
    ("targets: [postgres, oracle]\n", "targets"),
    ("health_addr: nowhere\n", "health_addr"),
    ("capture_raw_query: maybe\n", "capture_raw_query"),
    ("binaries: {db2: [/x]}\n", "binaries.db2"),
    ("- a list\n", "top level"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load({}, str(f), env={})
    assert key in str(exc.value)


def test_cli_exits_2_on_config_error(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("no_such_key: 1\n")
    assert main(["run", "--config", str(f)]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["run", "--binary", "nonsense"]) == 2
    assert main(["doctor", "--output", "kafka"]) == 2


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        load({}, None, env={"OTEL_BSP_MAX_QUEUE_SIZE": "many"})
