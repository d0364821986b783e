"""Static checks of the demo stack: docker-compose.yml, collector-config/, deploy/ and the Dockerfile.

No Docker engine here, so everything that can be checked without one is:
the compose file against the Compose schema (check-jsonschema's vendored copy: no
file from outside the repository), mounts and build contexts, every host:port a
config points at, the Prometheus config and alert rules with promtool (rules unit
tests included), the Alertmanager config with amtool, nginx's config with `nginx -t`,
and the metric names the dashboard and rules use, which must be names the agent
exports (derived from otel_ebpf.metrics.METRIC_INFO with the Prometheus naming rules)
and reach Prometheus by one path each.

Debian packages: prometheus (promtool), prometheus-alertmanager (amtool),
nginx and openssl; pip: check-jsonschema. Locally a missing tool skips its test;
under CI=true it fails.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from otel_ebpf import kheaders
from otel_ebpf.metrics import METRIC_INFO, prometheus_series_names

REPO = Path(__file__).resolve().parents[2]
CFG = REPO / "collector-config"
IN_CI = os.environ.get("CI") == "true"

# What the agent exports, under the names Prometheus sees (collector exporter or the
# agent's own --prometheus-addr endpoint, which name them alike): derived, not listed.
AGENT_METRICS = frozenset(n for metric in METRIC_INFO for n in prometheus_series_names(metric))
# Not from the agent: Prometheus's own scrape status, Tempo's metrics generator, the
# collector's own telemetry (job otelcol-self).
OTHER_METRICS = frozenset(["up"])
OTHER_PREFIXES = ("traces_spanmetrics_", "traces_service_graph_", "otelcol_")

# Ports the upstream images listen on by default (the others come from our configs).
IMAGE_PORTS = {
    "postgres": {5432},
    "mariadb": {3306},
    "prometheus": {9090},
    "alertmanager": {9093},
    "grafana": {3000},
}

REQUIRED_ALERTS = {
    "OtelcolExportFailing",
    "SlowQueriesP95",
    "SlowQuerySummary",
    "SlowQueryRateRising",
    "HttpServerErrorRatio",
    "OtelEbpfEventsLost",
    "OtelEbpfSpansDropped",
    "OtelEbpfAgentDown",
}


# ---------------------------------------------------------------- helpers


def need(path_or_tool, debian_package):
    """A tool on PATH (or a file): skip locally when missing, fail under CI."""
    if "/" in str(path_or_tool):
        found = Path(path_or_tool) if Path(path_or_tool).exists() else None
    else:
        found = shutil.which(path_or_tool)
    if found:
        return str(found)
    msg = f"{path_or_tool} is missing ({debian_package})"
    if IN_CI:
        pytest.fail(msg + " - required under CI")
    pytest.skip(msg)


def run(cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


@cache
def compose():
    return load_yaml(REPO / "docker-compose.yml")


def services():
    return compose()["services"]


def listen_ports(name):
    """Ports a compose service listens on: its `expose` plus the container side of `ports`."""
    svc = services()[name]
    ports = {int(p) for p in svc.get("expose", [])}
    for p in svc.get("ports", []):
        ports.add(int(str(p).split(":")[-1].split("/")[0]))
    return ports


def host_port(address):
    """(host, port) of "host:port" or a URL; URL default ports for http/https."""
    if "://" in address:
        u = urlsplit(address)
        return u.hostname, u.port or {"http": 80, "https": 443}[u.scheme]
    host, _, port = address.rpartition(":")
    return host, int(port)


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", Path(path).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# PromQL: names that are neither functions, keywords nor labels.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring",
                   "group_left", "group_right"}


def promql_metric_names(expr):
    """Metric names a PromQL expression (or a Grafana label_values() query) reads."""
    label_values = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", expr)
    if label_values:
        return {label_values.group(1)}
    names = set()
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers (and $variables in them)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries, $__rate_interval
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if not m.group(2) and m.group(1) not in PROMQL_KEYWORDS:
            names.add(m.group(1))
    return names


def promql_name_regexes(expr):
    """Regexes of {__name__=~"..."} selectors (which promql_metric_names does not see)."""
    return set(re.findall(r'__name__\s*=~\s*"((?:\\.|[^"\\])*)"', expr))


def allowed_metric(name):
    return name in AGENT_METRICS or name in OTHER_METRICS or name.startswith(OTHER_PREFIXES)


def allowed_name_regex(regex):
    """A __name__ regex must stay inside a family that is not the agent's (collector self-metrics)."""
    return regex.startswith(OTHER_PREFIXES) and not any(re.fullmatch(regex, n) for n in AGENT_METRICS)


@cache
def dashboard():
    return json.loads((CFG / "grafana/dashboards/otel-ebpf.json").read_text())


def dashboard_panels(panels=None):
    for p in dashboard()["panels"] if panels is None else panels:
        yield p
        yield from dashboard_panels(p.get("panels", []))


def target_datasource(panel, target):
    return target.get("datasource") or panel.get("datasource") or {}


def dashboard_exprs(datasource_type="prometheus"):
    """(panel, target) of every query of one data source type (PromQL by default)."""
    for p in dashboard_panels():
        for t in p.get("targets", []):
            if t.get("expr") and target_datasource(p, t).get("type") == datasource_type:
                yield p, t
    if datasource_type != "prometheus":
        return
    for var in dashboard().get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            yield var, {"expr": q}


def dashboard_metric_names(agent_only=False):
    """Every metric name the dashboard's PromQL (panels and variables) reads.

    agent_only=True leaves out `up` and Tempo's traces_spanmetrics_* series,
    i.e. returns the names the agent itself must export.
    """
    names = set()
    for _, target in dashboard_exprs():
        names |= promql_metric_names(target["expr"])
    if agent_only:
        names = {n for n in names if n not in OTHER_METRICS and not n.startswith(OTHER_PREFIXES)}
    return sorted(names)


@cache
def alert_rules():
    return {r["alert"]: r for g in load_yaml(CFG / "rules/otel-ebpf-alerts.yml")["groups"] for r in g["rules"]}


# ---------------------------------------------------------------- compose


def check_jsonschema():
    """check-jsonschema from this interpreter's environment (the venv) or PATH."""
    beside = Path(sys.executable).parent / "check-jsonschema"
    return str(beside) if beside.exists() else need("check-jsonschema", "pip package check-jsonschema")


def test_compose_validates_against_compose_spec():
    # The Compose schema vendored in check-jsonschema: works offline, from a lone clone.
    run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec", REPO / "docker-compose.yml"])


def test_compose_schema_check_catches_a_mistake(tmp_path):
    bad = dict(compose())
    bad["services"] = {**services(), "agent": {**services()["agent"], "cap_ad": ["BPF"]}}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([check_jsonschema(), "--builtin-schema", "vendor.compose-spec",
                           tmp_path / "docker-compose.yml"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "cap_ad" in proc.stdout + proc.stderr


def test_compose_has_the_stack_services():
    expected = {"agent", "postgres", "mariadb", "nginx", "loadgen", "otelcol", "tempo", "loki", "prometheus",
                "alertmanager", "grafana"}
    assert expected <= set(services())


def test_every_service_has_a_healthcheck_and_a_pinned_image():
    for name, svc in services().items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        assert not svc["healthcheck"].get("disable"), name
        if "build" in svc:
            continue  # built here: its Dockerfile's FROM lines are checked below
        image = svc["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned"


def build_dockerfiles():
    for name, svc in services().items():
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            ctx = REPO / build["context"]
            yield name, ctx, ctx / build.get("dockerfile", "Dockerfile")


def test_build_contexts_dockerfiles_and_copy_sources_exist():
    for name, ctx, dockerfile in build_dockerfiles():
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for instr, args in dockerfile_instructions(dockerfile):
            if instr == "FROM":
                image = args.split()[0]
                tag = image.rpartition(":")[2] if ":" in image else ""
                assert tag and tag != "latest" and re.search(r"\d", tag), f"{dockerfile}: FROM {image} not pinned"
            if instr in ("COPY", "ADD") and "--from=" not in args:
                parts = [a for a in args.split() if not a.startswith("--")]
                for src in parts[:-1]:
                    assert (ctx / src).exists(), f"{dockerfile}: COPY source {src} does not exist in {ctx}"


def test_bind_mounts_from_the_repo_exist():
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            source = vol.get("source") if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
            elif not source.startswith("/"):
                assert source in (compose().get("volumes") or {}), f"{name}: volume {source} not declared"


AGENT_CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE", "SYS_ADMIN"}


def test_agent_runs_with_least_privilege():
    agent = services()["agent"]
    assert not agent.get("privileged"), "the agent must not be privileged: it gets capabilities instead"
    assert agent["pid"] == "host"
    assert agent.get("cap_drop") == ["ALL"], "Docker's default capabilities are not needed"
    assert set(agent["cap_add"]) == AGENT_CAPS
    assert "network_mode" not in agent and "devices" not in agent
    mounts = {v.split(":")[0]: v.split(":")[1:] for v in agent["volumes"]}
    for path in ("/lib/modules", "/usr/src", "/sys/fs/cgroup"):
        assert mounts[path] == [path, "ro"], f"{path} must be mounted read-only at the same path"
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug"):
        assert mounts[path][0] == path
    assert not any("docker.sock" in v for v in agent["volumes"])
    assert agent["environment"]["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    cmd = agent["command"]
    assert cmd[0] == "run" and "--health-addr" in cmd and "--prometheus-addr" in cmd


def test_readiness_is_readyz_and_liveness_healthz():
    # Compose's "healthy" gates depends_on (the load starts once the probes are in):
    # that is readiness, /readyz (200 once every attach was tried). /healthz is liveness.
    agent = services()["agent"]
    test = " ".join(agent["healthcheck"]["test"])
    assert "/readyz" in test and "9464" in test and "/healthz" not in test
    assert services()["loadgen"]["depends_on"]["agent"]["condition"] == "service_healthy"


def test_agent_exports_metrics_as_often_as_prometheus_scrapes():
    interval_ms = int(services()["agent"]["environment"]["OTEL_METRIC_EXPORT_INTERVAL"])
    scrape = load_yaml(CFG / "prometheus.yml")["global"]["scrape_interval"]
    assert scrape.endswith("s") and interval_ms <= int(scrape[:-1]) * 1000, (
        "metrics must leave the agent at least once a scrape interval, or rate() dips to zero")


def test_agent_dockerfile():
    instrs = dockerfile_instructions(REPO / "Dockerfile")
    text = "\n".join(f"{i} {a}" for i, a in instrs)
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms and all(f.startswith("debian:12") for f in froms)
    stages = dict(re.match(r"(\S+)(?:\s+AS\s+(\S+))?", f, re.I).groups()[::-1] for f in froms)
    assert {"kernel-headers", "venv"} <= set(stages)
    # The final stage: bcc from Debian, not its command line tools.
    final = text[text.rindex("FROM "):]
    assert "python3-bpfcc" in final and "bpfcc-tools" not in text
    assert "--no-install-recommends" in final and "rm -rf /var/lib/apt/lists/*" in final
    assert re.search(r"/usr/bin/python3 -m venv --system-site-packages /opt/otel-ebpf", text)
    # Every PyPI package pinned: constraints.txt, as PIP_CONSTRAINT so that the isolated
    # build environment (setuptools, wheel) is pinned too.
    assert re.search(r"PIP_CONSTRAINT=/src/constraints\.txt \S+/pip install .*/src", text)
    assert "COPY --from=venv /opt/otel-ebpf /opt/otel-ebpf" in text
    entry = json.loads(dict(instrs)["ENTRYPOINT"]) + json.loads(dict(instrs)["CMD"])
    assert entry == ["otel-ebpf", "run"], "docker run IMAGE must run `otel-ebpf run`"
    # The build installs the package: what pyproject.toml needs must be copied.
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    copied = " ".join(a for i, a in instrs if i == "COPY")
    for need_path in ["constraints.txt", "pyproject.toml", "otel_ebpf", "probes", "usdt"] + (
            [readme.group(1)] if readme else []):
        assert need_path in copied, f"Dockerfile does not COPY {need_path}"


def test_image_bundles_headers_where_the_agent_looks():
    text = (REPO / "Dockerfile").read_text()
    assert f"COPY --from=kernel-headers /out {kheaders.BUNDLED_HEADERS}" in text
    assert "deploy/agent/bundle-kernel-headers.sh" in text


def test_constraints_pin_every_line_and_the_build_tools():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert m, f"constraints.txt: {line!r} is not name==version"
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    for name in ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc", "prometheus-client",
                 "grpcio", "protobuf", "setuptools", "wheel"):
        assert name in pins, f"constraints.txt does not pin {name}"


def test_dockerignore_keeps_the_context_small_but_not_what_the_build_copies():
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for must in (".venv", ".git", "tests"):
        assert must in ignored
    copied = [a.split()[0] for i, a in dockerfile_instructions(REPO / "Dockerfile")
              if i == "COPY" and "--from=" not in a]
    for src in copied:
        assert not any(src == ig or src.startswith(ig.rstrip("/") + "/") for ig in ignored), src


# ---------------------------------------------------------------- addresses


def config_addresses():
    """(where, address) of every place a config points at another service."""
    svcs = services()
    otelcol = load_yaml(CFG / "otelcol.yaml")
    for name, exp in otelcol["exporters"].items():
        if isinstance(exp, dict) and "endpoint" in exp and not exp["endpoint"].startswith("0.0.0.0"):
            yield f"otelcol.yaml exporters.{name}", exp["endpoint"]
    prom = load_yaml(CFG / "prometheus.yml")
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                yield f"prometheus.yml job {job['job_name']}", t.replace("localhost", "prometheus")
    for am in prom["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            for t in sc["targets"]:
                yield "prometheus.yml alertmanagers", t
    tempo = load_yaml(CFG / "tempo.yaml")
    for rw in tempo["metrics_generator"]["storage"]["remote_write"]:
        yield "tempo.yaml remote_write", rw["url"]
    for ds in load_yaml(CFG / "grafana/provisioning/datasources/datasources.yaml")["datasources"]:
        yield f"grafana datasource {ds['name']}", ds["url"]
    yield "agent OTEL_EXPORTER_OTLP_ENDPOINT", svcs["agent"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for key, value in svcs["loadgen"]["environment"].items():
        if key.endswith(("_ADDR", "_URL")):
            yield f"loadgen {key}", value


def test_every_address_in_the_configs_is_a_compose_service_port():
    svcs = services()
    seen = 0
    for where, address in config_addresses():
        host, port = host_port(address)
        assert host in svcs, f"{where}: {address}: {host} is not a service of docker-compose.yml"
        assert port in listen_ports(host), f"{where}: {address}: {host} does not listen on {port}"
        seen += 1
    assert seen >= 15


def test_services_listen_where_their_configs_say():
    otelcol = load_yaml(CFG / "otelcol.yaml")
    ports = {host_port(p["endpoint"])[1] for p in otelcol["receivers"]["otlp"]["protocols"].values()}
    ports.add(host_port(otelcol["exporters"]["prometheus"]["endpoint"])[1])
    ports.add(host_port(otelcol["extensions"]["health_check"]["endpoint"])[1])
    ports |= {r["pull"]["exporter"]["prometheus"]["port"] for r in otelcol["service"]["telemetry"]["metrics"]["readers"]}
    assert ports == listen_ports("otelcol")

    loki = load_yaml(CFG / "loki.yaml")
    assert {loki["server"]["http_listen_port"]} == listen_ports("loki")

    tempo = load_yaml(CFG / "tempo.yaml")
    ports = {tempo["server"]["http_listen_port"]}
    ports |= {host_port(p["endpoint"])[1] for p in tempo["distributor"]["receivers"]["otlp"]["protocols"].values()}
    assert ports == listen_ports("tempo")

    nginx = (REPO / "deploy/nginx/nginx.conf").read_text()
    assert {int(p) for p in re.findall(r"^\s*listen\s+(\d+)", nginx, re.M)} == listen_ports("nginx")

    cmd = services()["agent"]["command"]
    agent_ports = {host_port(cmd[cmd.index(flag) + 1])[1] for flag in ("--health-addr", "--prometheus-addr")}
    assert agent_ports == listen_ports("agent")

    for name, ports in IMAGE_PORTS.items():
        assert listen_ports(name) == ports, name


def test_healthchecks_probe_ports_their_service_listens_on():
    for name, svc in services().items():
        test = " ".join(svc["healthcheck"]["test"][1:])
        for url in re.findall(r"https?://(?:localhost|127\.0\.0\.1)[^\s'\"]*", test):
            assert host_port(url)[1] in listen_ports(name), f"{name}: healthcheck {url}"


# ---------------------------------------------------------------- prometheus, alertmanager


def test_promtool_check_config():
    promtool = need("promtool", "Debian package prometheus")
    run([promtool, "check", "config", CFG / "prometheus.yml"])


def test_promtool_check_rules():
    promtool = need("promtool", "Debian package prometheus")
    run([promtool, "check", "rules", CFG / "rules/otel-ebpf-alerts.yml"])


def test_promtool_rule_unit_tests():
    promtool = need("promtool", "Debian package prometheus")
    run([promtool, "test", "rules", "otel-ebpf-alerts.test.yml"], cwd=CFG / "rules")


def test_amtool_check_config():
    amtool = need("amtool", "Debian package prometheus-alertmanager")
    run([amtool, "check-config", CFG / "alertmanager.yml"])


def test_prometheus_is_started_with_remote_write_and_exemplars():
    cmd = services()["prometheus"]["command"]
    assert "--web.enable-remote-write-receiver" in cmd
    assert "--enable-feature=exemplar-storage" in cmd
    jobs = {j["job_name"] for j in load_yaml(CFG / "prometheus.yml")["scrape_configs"]}
    assert "otel-ebpf-agent" in jobs


def test_alert_rules_are_complete_and_labelled():
    rules = alert_rules()
    assert REQUIRED_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        names = promql_metric_names(rule["expr"])
        regexes = promql_name_regexes(rule["expr"])
        assert names or regexes, name
        assert all(allowed_metric(n) for n in names), f"{name}: {names}"
        assert all(allowed_name_regex(r) for r in regexes), f"{name}: {regexes}"
        if name != "OtelEbpfAgentDown":
            assert "job" not in rule["expr"], f"{name}: rules must not depend on job"


def test_every_alert_has_firing_and_not_firing_cases():
    tests = load_yaml(CFG / "rules/otel-ebpf-alerts.test.yml")["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert set(alert_rules()) <= firing, f"never shown firing: {set(alert_rules()) - firing}"
    assert set(alert_rules()) <= quiet, f"never shown not firing: {set(alert_rules()) - quiet}"


# ---------------------------------------------------------------- collector, tempo, grafana


def test_otelcol_config():
    cfg = load_yaml(CFG / "otelcol.yaml")
    assert {"receivers", "processors", "exporters", "service"} <= set(cfg)
    assert {"grpc", "http"} <= set(cfg["receivers"]["otlp"]["protocols"])
    assert "batch" in cfg["processors"]
    assert cfg["exporters"]["prometheus"]["enable_open_metrics"] is True
    pipelines = cfg["service"]["pipelines"]
    assert {"traces", "metrics", "logs"} <= set(pipelines)
    for pname, p in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                assert comp in cfg[kind], f"pipeline {pname}: {kind[:-1]} {comp} is not defined"
    assert "batch" in pipelines["traces"]["processors"]
    assert host_port(cfg["exporters"][pipelines["traces"]["exporters"][0]]["endpoint"])[0] == "tempo"
    assert "prometheus" in pipelines["metrics"]["exporters"]
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg["extensions"]


def test_slow_query_logs_go_to_loki():
    cfg = load_yaml(CFG / "otelcol.yaml")
    exporters = cfg["service"]["pipelines"]["logs"]["exporters"]
    # Not the debug exporter (at verbosity basic it printed counts only): a log store.
    assert "debug" not in exporters
    (name,) = [e for e in exporters if e.startswith("otlphttp")]
    endpoint = cfg["exporters"][name]["endpoint"]
    assert host_port(endpoint) == ("loki", 3100) and urlsplit(endpoint).path == "/otlp"
    loki = load_yaml(CFG / "loki.yaml")
    assert loki["limits_config"]["allow_structured_metadata"] is True  # trace_id lives there
    assert loki["schema_config"]["configs"][-1]["schema"] == "v13"  # structured metadata needs v13
    assert "loki-data" in compose()["volumes"]


def test_collector_telemetry_is_scraped():
    cfg = load_yaml(CFG / "otelcol.yaml")
    (reader,) = cfg["service"]["telemetry"]["metrics"]["readers"]
    prom = reader["pull"]["exporter"]["prometheus"]
    assert prom["host"] == "0.0.0.0", "the default (localhost) is unreachable from Prometheus"
    jobs = {j["job_name"]: j for j in load_yaml(CFG / "prometheus.yml")["scrape_configs"]}
    targets = [t for j in jobs.values() for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert f"otelcol:{prom['port']}" in targets


def test_tempo_config():
    cfg = load_yaml(CFG / "tempo.yaml")
    assert {"server", "distributor", "ingester", "metrics_generator", "storage", "overrides"} <= set(cfg)
    processors = cfg["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert {"service-graphs", "span-metrics"} <= set(processors)
    rw = cfg["metrics_generator"]["storage"]["remote_write"]
    assert any(urlsplit(r["url"]).path == "/api/v1/write" and r.get("send_exemplars") for r in rw)


def test_tempo_answers_traceql_metrics_queries():
    # TraceQL metrics (query_range) read the metrics generator's local blocks.
    cfg = load_yaml(CFG / "tempo.yaml")
    assert "local-blocks" in cfg["overrides"]["defaults"]["metrics_generator"]["processors"]
    assert "local_blocks" in cfg["metrics_generator"]["processor"]
    assert cfg["metrics_generator"]["traces_storage"]["path"].startswith("/var/tempo/")
    mounts = dict(v.split(":")[:2][::-1] for v in services()["tempo"]["volumes"])
    assert mounts.get("/var/tempo") == "tempo-data"


def test_grafana_datasources_link_traces_and_metrics():
    cfg = load_yaml(CFG / "grafana/provisioning/datasources/datasources.yaml")
    assert cfg["apiVersion"] == 1
    by_type = {ds["type"]: ds for ds in cfg["datasources"]}
    prom, tempo = by_type["prometheus"], by_type["tempo"]
    uids = {ds["uid"] for ds in cfg["datasources"]}
    assert len(uids) == len(cfg["datasources"])
    dests = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert {d["name"] for d in dests} >= {"trace_id"} and all(d["datasourceUid"] == tempo["uid"] for d in dests)
    assert tempo["jsonData"]["tracesToMetrics"]["datasourceUid"] == prom["uid"]
    assert tempo["jsonData"]["serviceMap"]["datasourceUid"] == prom["uid"]
    queries = [q["query"] for q in tempo["jsonData"]["tracesToMetrics"].get("queries", [])]
    queries.append(tempo["jsonData"]["tracesToLogsV2"]["query"])
    for q in queries:
        # Grafana expands $VAR in provisioning files: $__tags must be written $$__tags.
        assert not re.search(r"(?<!\$)\$(?!\$)", q.replace("$$", "")), q


def test_grafana_links_traces_and_logs_both_ways():
    cfg = load_yaml(CFG / "grafana/provisioning/datasources/datasources.yaml")
    by_type = {ds["type"]: ds for ds in cfg["datasources"]}
    tempo, loki = by_type["tempo"], by_type["loki"]
    assert host_port(loki["url"]) == ("loki", 3100)
    # trace -> logs: the trace id is structured metadata (OTLP into Loki), not in the line.
    to_logs = tempo["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == loki["uid"]
    assert {"key": "service.name", "value": "service_name"} in to_logs["tags"]
    assert to_logs["customQuery"] is True and 'trace_id="$${__trace.traceId}"' in to_logs["query"]
    # logs -> trace: the trace_id field links to Tempo.
    (field,) = loki["jsonData"]["derivedFields"]
    assert field["datasourceUid"] == tempo["uid"]
    assert field["matcherType"] == "label" and field["matcherRegex"] == "trace_id"


def test_grafana_dashboard_provider_matches_the_mount():
    cfg = load_yaml(CFG / "grafana/provisioning/dashboards/dashboards.yaml")
    assert cfg["apiVersion"] == 1
    path = cfg["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in services()["grafana"]["volumes"])
    assert mounts.get(path) == "./collector-config/grafana/dashboards"


# ---------------------------------------------------------------- dashboard


def test_dashboard_uses_only_known_metric_names():
    names = dashboard_metric_names()
    unknown = [n for n in names if not allowed_metric(n)]
    assert not unknown, f"dashboard reads metrics nobody exports: {unknown}"
    agent = set(dashboard_metric_names(agent_only=True))
    # The panels the issue asks for.
    assert {"db_server_operation_duration_seconds_bucket", "otel_ebpf_db_slow_operations_total",
            "http_server_request_duration_seconds_bucket", "otel_ebpf_events_lost_total",
            "otel_ebpf_spans_dropped_total", "otel_ebpf_probes_attached",
            "otel_ebpf_ringbuf_usage_ratio"} <= agent
    assert any(n.startswith("traces_spanmetrics_") for n in names)
    regexes = {r for _, t in dashboard_exprs() for r in promql_name_regexes(t["expr"])}
    assert all(allowed_name_regex(r) for r in regexes), regexes


def test_dashboard_latency_panels_have_exemplars_and_known_datasources():
    uids = {ds["uid"] for ds in load_yaml(CFG / "grafana/provisioning/datasources/datasources.yaml")["datasources"]}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            ds = target_datasource(panel, target)
            assert ds.get("uid") in uids, f"{panel.get('title')}: unknown datasource {ds}"
    for panel, target in dashboard_exprs():
        if "histogram_quantile" in target["expr"] and panel.get("type") == "timeseries":
            assert target.get("exemplar") is True, f"{panel['title']}: exemplars off"


def test_dashboard_shows_the_slow_query_log():
    logql = [(p, t) for p, t in dashboard_exprs("loki")]
    assert logql and any(p["type"] == "logs" for p, _ in logql)
    for _, target in logql:
        # Loki indexes service.name as service_name (OTLP ingestion); a selector must match something.
        assert re.match(r'\{service_name=~?"[^"]+"\}', target["expr"]), target["expr"]


def test_promql_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, db_system_name) (rate(x_bucket{a=~"$s", b!="c d"}'
            '[$__rate_interval]))) > 2 * sum(rate(y_total[10m] offset 1h)) and on() up == 0')
    assert promql_metric_names(expr) == {"x_bucket", "y_total", "up"}
    assert promql_metric_names("label_values(z_count, db_system_name)") == {"z_count"}
    assert promql_name_regexes('rate({__name__=~"otelcol_a_(b|c)"}[5m])') == {"otelcol_a_(b|c)"}


# ---------------------------------------------------------------- one path, one name


def relabel_keeps(job, name):
    """Whether a scrape job's metric_relabel_configs keep a series named `name`."""
    for rule in job.get("metric_relabel_configs", []):
        assert rule["source_labels"] == ["__name__"], rule
        hit = re.fullmatch(rule["regex"], name) is not None  # Prometheus anchors regexes
        if rule["action"] == "keep" and not hit or rule["action"] == "drop" and hit:
            return False
    return True


def test_metric_names_are_derived_from_the_agent():
    assert "db_server_operation_duration_seconds_bucket" in AGENT_METRICS
    assert "otel_ebpf_sampling_ratio" in AGENT_METRICS  # a gauge of unit "1" named *.ratio
    assert "otel_ebpf_sampling_ratio_ratio" not in AGENT_METRICS
    assert "otel_ebpf_spans_sampled_out_total" in AGENT_METRICS


def test_each_agent_series_reaches_prometheus_by_one_path():
    jobs = {j["job_name"]: j for j in load_yaml(CFG / "prometheus.yml")["scrape_configs"]}
    via_collector, direct = jobs["otelcol"], jobs["otel-ebpf-agent"]
    for name in sorted(AGENT_METRICS):
        paths = [job for job in (via_collector, direct) if relabel_keeps(job, name)]
        assert len(paths) == 1, f"{name} reaches Prometheus by {len(paths)} paths"
    # Application metrics keep their exemplars: through the collector.
    for name in ("db_server_operation_duration_seconds_bucket", "otel_ebpf_db_slow_operations_total",
                 "http_server_request_duration_seconds_bucket"):
        assert relabel_keeps(via_collector, name), name
    # The agent's health is seen even when the OTLP path is what broke: straight from it.
    for name in ("otel_ebpf_events_lost_total", "otel_ebpf_spans_dropped_total", "otel_ebpf_probes_attached",
                 "otel_ebpf_operations_total", "otel_ebpf_target_counts_total", "otel_ebpf_sampling_ratio"):
        assert relabel_keeps(direct, name), name


def test_rules_and_dashboard_read_each_agent_series_where_it_arrives():
    names = set(dashboard_metric_names(agent_only=True))
    for rule in alert_rules().values():
        names |= {n for n in promql_metric_names(rule["expr"]) if n in AGENT_METRICS}
    assert names <= AGENT_METRICS
    assert not {n for n in AGENT_METRICS if n.endswith("_ratio_ratio")}


# ---------------------------------------------------------------- deploy/


def test_nginx_config_and_certificate_script(tmp_path):
    nginx = need("nginx", "Debian package nginx")
    need("openssl", "Debian package openssl")
    tls = tmp_path / "tls"
    env = dict(os.environ, TLS_DIR=str(tls))
    proc = subprocess.run(["sh", str(REPO / "deploy/nginx/gen-cert.sh"), "true"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tls / "server.crt").stat().st_size and (tls / "server.key").stat().st_size
    conf = (REPO / "deploy/nginx/nginx.conf").read_text()
    conf = conf.replace("/etc/nginx/tls", str(tls)).replace("/run/nginx.pid", str(tmp_path / "nginx.pid"))
    (tmp_path / "nginx.conf").write_text(conf)
    run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])


def test_loadgen_compiles_and_reads_what_compose_sets():
    src = REPO / "deploy/loadgen/loadgen.py"
    text = src.read_text()
    compile(text, str(src), "exec")
    for key in services()["loadgen"]["environment"]:
        assert f'"{key}"' in text, f"loadgen.py does not read {key}"
    # pg_sleep/SLEEP of more than the agent's 0.5 s threshold, and failing queries.
    assert "pg_sleep" in text and "SLEEP(" in text and "missing_table" in text
