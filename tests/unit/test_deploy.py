"""deploy/kubernetes/ and the agent image's build scripts, checked without a cluster.

Every Kubernetes manifest is validated, strictly (unknown fields are errors), against
the OpenAPI schemas of each Kubernetes release from 1.30 to the newest that
kubernetes-validate ships (no network). Then what a schema cannot say: the agent's
DaemonSet grants exactly what the compose file grants, its probes, limits and
downward-API host.name; the collectors' configs are consistent with each other and
with the Services and RBAC; each agent metric has one path to Prometheus; the kernel
headers the image bundles cover what the probes include.
"""
from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from otel_ebpf.metrics import METRIC_INFO, prometheus_series_names

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/kubernetes"
MIN_KUBERNETES = "1.30"  # the oldest release the manifests are validated against (and meant for)


def kubernetes_versions() -> list[str]:
    if os.environ.get("CI") == "true":  # CI installs it (constraints.txt): its absence is a failure there
        import kubernetes_validate.utils as kv
    else:
        kv = pytest.importorskip("kubernetes_validate.utils")
    versions = [v for v in kv.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 30)]
    assert versions, "kubernetes-validate ships no schema for 1.30 or later"
    return versions


@cache
def manifests() -> dict[str, list[dict]]:
    """Objects of every manifest file (kustomization.yaml is kustomize's, not the API's)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def objects(kind: str | None = None) -> list[dict]:
    return [o for docs in manifests().values() for o in docs if kind is None or o["kind"] == kind]


def named(kind: str, name: str) -> dict:
    (obj,) = [o for o in objects(kind) if o["metadata"]["name"] == name]
    return obj


def collector_config(configmap: str) -> dict:
    return yaml.safe_load(named("ConfigMap", configmap)["data"]["config.yaml"])


def agent_container() -> dict:
    (container,) = named("DaemonSet", "otel-ebpf-agent")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", kubernetes_versions())
def test_every_manifest_validates_against_the_kubernetes_schema(version):
    import kubernetes_validate

    seen = 0
    for name, docs in manifests().items():
        for obj in docs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(map(str, exc.path))
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message} "
                            f"(Kubernetes {version})")
            seen += 1
    assert seen >= 10


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    ds = yaml.safe_load(yaml.safe_dump(named("DaemonSet", "otel-ebpf-agent")))
    ds["spec"]["template"]["spec"]["hostPid"] = True  # hostPID
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_versions()[-1], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests())
    (image,) = kustomization["images"]
    assert agent_container()["image"].split(":")[0] == image["name"]


def test_everything_lives_in_the_otel_ebpf_namespace():
    (ns,) = objects("Namespace")
    assert ns["metadata"]["name"] == "otel-ebpf"
    # hostPID, host paths and these capabilities are beyond Pod Security "baseline".
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in objects():
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "otel-ebpf", obj["metadata"]["name"]


# ---------------------------------------------------------------- the agent


def compose_agent() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["agent"]


def test_agent_daemonset_grants_exactly_what_compose_grants():
    pod = named("DaemonSet", "otel-ebpf-agent")["spec"]["template"]["spec"]
    container = agent_container()
    sc = container["securityContext"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == set(compose_agent()["cap_add"])
    assert compose_agent()["cap_drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # No API access: no token, no RBAC for the agent.
    assert pod["automountServiceAccountToken"] is False
    sa = named("ServiceAccount", pod["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    bound = {s["name"] for b in objects("ClusterRoleBinding") + objects("RoleBinding") for s in b["subjects"]}
    assert pod["serviceAccountName"] not in bound


def test_agent_mounts_are_the_ones_documented():
    pod = named("DaemonSet", "otel-ebpf-agent")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in agent_container()["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} == set(volumes)
    host_paths = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
                  for m in mounts.values() if "hostPath" in volumes[m["name"]]}
    # tracefs read-write (uprobe_events); cgroups read-only; nothing else of the host:
    # no kernel headers (the image bundles them), no debugfs, no container runtime socket.
    assert host_paths == {"/sys/kernel/tracing": "/sys/kernel/tracing", "/sys/fs/cgroup": "/sys/fs/cgroup"}
    assert mounts["/sys/fs/cgroup"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the read-only root's one writable place
    docs = (REPO / "docs/deploy.md").read_text()
    for path in (*host_paths, "/tmp", "/lib/modules", "/usr/src"):
        assert f"`{path}`" in docs, f"docs/deploy.md does not say what {path} is for"


def test_agent_probes_limits_and_resource_attributes():
    container = agent_container()
    args = container["args"]
    health_port = int(args[args.index("--health-addr") + 1].rpartition(":")[2])
    metrics_port = int(args[args.index("--prometheus-addr") + 1].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": health_port, "metrics": metrics_port}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == health_port, probe
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert container["resources"]["requests"]["memory"]
    env = env_of(container)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["OTEL_RESOURCE_ATTRIBUTES"]["value"] == "host.name=$(NODE_NAME)"
    names = [e["name"] for e in container["env"]]
    assert names.index("NODE_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(NODE_NAME) must be defined first"
    assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]["value"]) <= 15000
    annotations = named("DaemonSet", "otel-ebpf-agent")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port


def test_agent_sends_to_the_gateway_service():
    env = env_of(agent_container())
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    m = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", endpoint)
    assert m, endpoint
    service = named("Service", m.group(1))
    assert service["metadata"]["namespace"] == m.group(2)
    assert int(m.group(3)) in {p["port"] for p in service["spec"]["ports"]}
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "grpc" and m.group(3) == "4317"


# ---------------------------------------------------------------- the collectors


def components_defined(cfg: dict) -> None:
    for pname, pipeline in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipeline.get(kind, []):
                assert comp in cfg[kind], f"pipeline {pname}: {kind[:-1]} {comp} is not defined"
    for ext in cfg["service"].get("extensions", []):
        assert ext in cfg["extensions"]


@pytest.mark.parametrize("configmap", ["otelcol-gateway", "otelcol-traces"])
def test_collector_configs_are_complete_and_match_their_deployments(configmap):
    cfg = collector_config(configmap)
    components_defined(cfg)
    deployment = named("Deployment", configmap)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(cfg["extensions"]["health_check"]["endpoint"].rpartition(":")[2]) == ports["health"]
    (reader,) = cfg["service"]["telemetry"]["metrics"]["readers"]
    assert reader["pull"]["exporter"]["prometheus"]["port"] == ports["telemetry"]
    for proto, port_name in (("grpc", "otlp-grpc"), ("http", "otlp-http")):
        if proto in cfg["receivers"]["otlp"]["protocols"]:
            endpoint = cfg["receivers"]["otlp"]["protocols"][proto]["endpoint"]
            assert endpoint.startswith("0.0.0.0:") and int(endpoint.rpartition(":")[2]) == ports[port_name]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == configmap
    assert "--config=/conf/config.yaml" in container["args"]
    # The same collector release as the compose stack.
    compose_tag = re.search(r"^FROM otel/opentelemetry-collector-contrib:(\S+)",
                            (REPO / "deploy/otelcol/Dockerfile").read_text(), re.M).group(1)
    assert container["image"] == f"otel/opentelemetry-collector-contrib:{compose_tag}"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_gateway_enriches_by_container_id():
    k8s = collector_config("otelcol-gateway")["processors"]["k8sattributes"]
    # Only container.id: the connection's address is the agent's, not the watched pod's.
    assert k8s["pod_association"] == [{"sources": [{"from": "resource_attribute", "name": "container.id"}]}]
    metadata = set(k8s["extract"]["metadata"])
    assert {"k8s.pod.name", "k8s.namespace.name", "k8s.deployment.name"} <= metadata
    # Association by container.id needs a container-level attribute among those extracted.
    assert metadata & {"k8s.container.name", "container.image.name", "container.image.tag"}
    for pipeline in collector_config("otelcol-gateway")["service"]["pipelines"].values():
        procs = pipeline["processors"]
        assert "k8sattributes" in procs and procs.index("k8sattributes") < procs.index("batch")


def test_gateway_rbac_reads_pods_namespaces_and_replicasets_only():
    role = named("ClusterRole", "otel-ebpf-otelcol-gateway")
    granted = {(group, res) for rule in role["rules"] for group in rule["apiGroups"] for res in rule["resources"]}
    assert granted == {("", "pods"), ("", "namespaces"), ("apps", "replicasets")}
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}
    binding = named("ClusterRoleBinding", "otel-ebpf-otelcol-gateway")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    gateway = named("Deployment", "otelcol-gateway")["spec"]["template"]["spec"]
    assert subject["name"] == gateway["serviceAccountName"] and subject["namespace"] == "otel-ebpf"


def test_gateway_load_balances_traces_by_trace_id_to_tier_two():
    lb = collector_config("otelcol-gateway")["exporters"]["loadbalancing"]
    assert lb["routing_key"] == "traceID"
    dns = lb["resolver"]["dns"]
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", dns["hostname"])
    service = named("Service", m.group(1))
    assert service["spec"]["clusterIP"] == "None", "the dns resolver needs every pod: a headless Service"
    assert service["metadata"]["namespace"] == m.group(2)
    tier2 = named("Deployment", "otelcol-traces")
    assert service["spec"]["selector"].items() <= tier2["spec"]["template"]["metadata"]["labels"].items()
    receiver = collector_config("otelcol-traces")["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert dns["port"] == int(receiver.rpartition(":")[2]) in {p["port"] for p in service["spec"]["ports"]}
    assert collector_config("otelcol-gateway")["service"]["pipelines"]["traces"]["exporters"] == ["loadbalancing"]
    exporters = collector_config("otelcol-traces")["exporters"]
    assert [e for e in exporters if e.startswith("otlp")] and "tempo" in str(exporters)


def test_gateway_sends_slow_query_logs_to_loki_and_metrics_by_one_path():
    cfg = collector_config("otelcol-gateway")
    (logs_exporter,) = cfg["service"]["pipelines"]["logs"]["exporters"]
    assert cfg["exporters"][logs_exporter]["endpoint"].endswith("/otlp")
    # The filter drops exactly the agent metrics that the compose stack scrapes straight
    # from the agent (job otel-ebpf-agent): its OTTL conditions, read as regexes.
    (condition,) = cfg["processors"]["filter/agent-health"]["metrics"]["metric"]
    m = re.fullmatch(r'IsMatch\(name, "([^"]+)"\) and not IsMatch\(name, "([^"]+)"\)', condition)
    assert m, condition
    drop, keep = (p.replace("\\\\", "\\") for p in m.groups())
    prom = yaml.safe_load((REPO / "collector-config/prometheus.yml").read_text())
    (agent_rule,) = next(j for j in prom["scrape_configs"] if j["job_name"] == "otel-ebpf-agent")["metric_relabel_configs"]
    for metric in METRIC_INFO:
        dropped_here = bool(re.search(drop, metric)) and not re.search(keep, metric)
        scraped_there = all(not re.fullmatch(agent_rule["regex"], n) for n in prometheus_series_names(metric))
        assert dropped_here == scraped_there, metric


# ---------------------------------------------------------------- the image


def bundle_script() -> str:
    return (REPO / "deploy/agent/bundle-kernel-headers.sh").read_text()


def keep_list(var: str) -> set[str]:
    return set(re.search(rf'^{var}="([^"]*)"', bundle_script(), re.M).group(1).split())


def test_bundled_headers_cover_every_include_of_the_probes():
    top, linux, uapi = keep_list("KEEP_INCLUDE_DIRS"), keep_list("KEEP_LINUX_SUBDIRS"), keep_list("KEEP_UAPI_SUBDIRS")
    includes = set()
    for source in (REPO / "probes").glob("*.[ch]"):
        includes |= set(re.findall(r"^\s*#\s*include\s*<([^>]+)>", source.read_text(), re.M))
    assert includes, "no system include found: the check would prove nothing"
    for inc in includes:
        parts = inc.split("/")
        if parts[0] in ("asm", "linux") and len(parts) == 2:
            continue  # arch/<arch>/include/asm and include/linux: kept whole
        assert parts[0] in top or parts[0] == "asm", f"<{inc}>: include/{parts[0]} is not bundled"
        if parts[0] == "linux" and len(parts) > 2:
            assert parts[1] in linux, f"<{inc}>: include/linux/{parts[1]} is not bundled"
        if parts[0] == "uapi" and len(parts) > 2:
            assert parts[1] in uapi, f"<{inc}>: include/uapi/{parts[1]} is not bundled"
    # bcc's own helpers reach these: never prune them.
    assert {"linux", "uapi", "asm-generic", "generated", "vdso"} <= top
    assert {"byteorder"} <= linux and {"linux", "asm-generic"} <= uapi


def test_bundle_script_handles_both_architectures():
    text = bundle_script()
    assert "amd64) srcarch=x86" in text and "arm64) srcarch=arm64" in text


def apt_packages(text: str) -> set[str]:
    pkgs = set()
    for m in re.finditer(r"apt-get install ([^\n;&|']+)", text.replace("\\\n", " ")):
        pkgs |= {w for w in m.group(1).split() if not w.startswith("-") and not w.startswith(">")}
    return pkgs


def test_image_measurement_follows_the_dockerfile():
    dockerfile = (REPO / "Dockerfile").read_text()
    measure = (REPO / "deploy/agent/measure-image.sh").read_text()
    assert apt_packages(dockerfile) == apt_packages(measure) == {"python3-bpfcc", "python3-venv"}
    assert "PIP_CONSTRAINT=/src/constraints.txt" in measure
    assert "pip uninstall -y -q pip setuptools wheel" in dockerfile and "pip uninstall -y -q pip setuptools wheel" in measure
    assert "bundle-kernel-headers.sh" in measure


def test_setup_installs_headers_for_this_architecture():
    setup = (REPO / "scripts/setup.sh").read_text()
    assert "dpkg --print-architecture" in setup
    assert "linux-headers-amd64" not in setup, "the fallback header package must follow the architecture"
