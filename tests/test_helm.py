"""The Helm chart, rendered by a real helm binary and validated against the Kubernetes
schemas (kubernetes-validate), its values schema, promtool, and its own README."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm_helpers import (
    CHART,
    EXAMPLES,
    REQUIRED_VALUES,
    ROOT,
    by_kind,
    helm,
    render,
    render_app_chart,
    values_table,
)
from tests.tools import require_binary, require_helm

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

K8S_VERSION = "1.35.0"  # a current release (native sidecars are GA since 1.33)
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "PodMonitor"}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return require_helm()


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def k8s_validate(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.unit
def test_helm_values_and_examples_match_the_schema() -> None:
    """values.yaml and every example values file validate against values.schema.json."""
    jsonschema.Draft7Validator.check_schema(schema())
    for path in (CHART / "values.yaml", EXAMPLES / "values-standalone.yaml",
                 EXAMPLES / "values-full.yaml"):
        jsonschema.validate(load(path), schema())


@pytest.mark.parametrize("bad", [
    {"repairy": {"baseUrl": "ftp://partners.example"}},
    {"gatway": {"port": 8080}},
    {"gateway": {"port": 70000}},
    {"gateway": {"logLevel": "chatty"}},
    {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
    {"inbound": {"clientKeys": {"billing": "short"}}},
    {"inbound": {"allowedCidrs": ["everyone"]}},
    {"gateway": {"extraSettings": {"PATH": "/tmp"}}},
    {"securityContext": {"runAsNonRoot": False}},
    {"securityContext": {"allowPrivilegeEscalation": True}},
    {"metrics": {"serviceMonitor": {"interval": "often"}}},
    {"replicaCount": 0},
])
def test_helm_schema_rejects_wrong_values(bad: dict[str, Any], helm_bin: str,
                                          tmp_path: Path) -> None:
    """Wrong values fail schema validation, both in jsonschema and in helm itself."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(REQUIRED_VALUES))
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump(bad))
    result = helm(helm_bin, "template", "demo", str(CHART), "-f", str(good))
    assert result.returncode == 0, result.stderr  # the same, minus the bad part, renders
    result = helm(helm_bin, "template", "demo", str(CHART), "-f", str(good), "-f", str(values))
    assert result.returncode != 0
    assert "values don't meet the specifications" in result.stderr or "schema" in \
        result.stderr.lower()


def test_helm_lint_passes_for_examples(helm_bin: str) -> None:
    """helm lint --strict passes with each example values file."""
    for values in ("values-standalone.yaml", "values-full.yaml"):
        result = helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(EXAMPLES / values))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", ["values-standalone.yaml", "values-full.yaml"])
def test_helm_rendered_manifests_validate_against_kubernetes(helm_bin: str,
                                                             values: str) -> None:
    """Every rendered resource is valid for Kubernetes (strict: no unknown fields)."""
    docs = render(helm_bin, "-f", str(EXAMPLES / values))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap",
            "PodDisruptionBudget"} <= kinds
    if values == "values-full.yaml":
        assert {"HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
                "Secret"} <= kinds
    k8s_validate(docs)


def test_helm_deployment_is_hardened_and_probed(helm_bin: str) -> None:
    """Non-root, read-only root, no capabilities, RuntimeDefault seccomp, no SA token,
    probes on /healthz and /readyz, credentials as files, grace above the drain time."""
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"))
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no GATEWAY_SERVICE_HOST & co. in its env
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > 5 + 20
    config = by_kind(docs, "ConfigMap")["data"]
    assert config["REPAIRY_APP_SECRET_FILE"].startswith("/etc/repairy-gateway/credentials/")
    assert "REPAIRY_APP_SECRET" not in config  # secrets only as mounted files
    assert config["GATEWAY_LISTEN"] == "0.0.0.0:8080"
    assert config["GATEWAY_CLIENT_KEYS_FILE"]
    assert config["GATEWAY_READ_TIMEOUT"] == "30s"


def test_helm_standalone_refuses_to_render_without_access_control(helm_bin: str) -> None:
    """Standalone listens beyond loopback: no client keys and no CIDRs is a render error."""
    result = helm(helm_bin, "template", "demo", str(CHART),
                  "--set", "repairy.baseUrl=https://x.example",
                  "--set", "credentials.existingSecret=s")
    assert result.returncode != 0
    assert "inbound.clientKeys" in result.stderr


def test_helm_network_policy_limits_egress_to_upstream_and_dns(helm_bin: str) -> None:
    """Egress: DNS and the upstream CIDRs on the upstream port only; ingress from chosen
    peers (proxy) and Prometheus (admin)."""
    policy = by_kind(render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml")),
                     "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, upstream, redis = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert upstream["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    assert [p["port"] for p in upstream["ports"]] == [443]
    assert redis["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert [p["port"] for p in redis["ports"]] == [6380]
    proxy_rule, metrics_rule = policy["ingress"]
    assert proxy_rule["from"] and metrics_rule["ports"][0]["port"] == "admin"


def test_helm_prometheus_rule_matches_shipped_alerts(helm_bin: str, tmp_path: Path) -> None:
    """The PrometheusRule's groups pass promtool check rules and the same promtool unit tests
    as config/prometheus/alerts.yml; the ServiceMonitor scrapes the admin port."""
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"))
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": by_kind(docs, "PrometheusRule")["spec"]
                                     ["groups"]}))
    tests = tmp_path / "rules_test.yml"
    tests.write_text((ROOT / "tests" / "prometheus" / "alerts_test.yml").read_text().replace(
        "../../config/prometheus/alerts.yml", str(rules)))
    promtool = require_binary("promtool", "prometheus")
    for args in (["check", "rules", str(rules)], ["test", "rules", str(tests)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    monitor = by_kind(docs, "ServiceMonitor")["spec"]
    service = by_kind(docs, "Service")
    assert monitor["endpoints"][0]["port"] == "admin"
    assert "admin" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_helm_sidecar_example_renders_valid_native_sidecar(helm_bin: str,
                                                            tmp_path: Path) -> None:
    """The example app chart includes the sidecar template: an init container with
    restartPolicy Always, listening on loopback; valid for Kubernetes; and the committed
    helm/examples/sidecar-deployment.yaml is exactly that rendering."""
    rendered = render_app_chart(helm_bin, tmp_path)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    k8s_validate(docs)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["GATEWAY_LISTEN"] == "127.0.0.1:8080"
    assert {v["name"] for v in pod["volumes"]} == {"repairy-credentials", "repairy-state"}
    assert [c["name"] for c in pod["containers"]] == ["app"]
    example = (EXAMPLES / "sidecar-deployment.yaml").read_text()
    assert example.split("\n---\n", 1)[1] == rendered.split("---\n", 1)[1]


def test_helm_sidecar_requires_existing_secret(helm_bin: str, tmp_path: Path) -> None:
    """The sidecar template refuses inline credentials: they belong in a Secret."""
    app = EXAMPLES / "app-chart"
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"repairy-gateway": {"credentials": {
        "existingSecret": ""}}}))
    copy_dir = tmp_path / "w"
    copy_dir.mkdir()
    render_app_chart(helm_bin, copy_dir)  # builds dependencies in copy_dir/app-chart
    result = helm(helm_bin, "template", "demo", str(copy_dir / "app-chart"), "-f", str(values))
    assert result.returncode != 0
    assert "existingSecret" in result.stderr
    assert app.exists()


def test_helm_sidecar_knows_its_replicas_and_refuses_more_than_one_pod_without_redis(
        helm_bin: str, tmp_path: Path) -> None:
    """The sidecar include needs the host's replica count and autoscaling flag; more than one
    pod possible without the shared store is a render error (as in standalone mode), and
    with Redis (or the explicit opt-out) it renders."""
    copy_dir = tmp_path / "w"
    copy_dir.mkdir()
    render_app_chart(helm_bin, copy_dir)  # builds dependencies in copy_dir/app-chart
    chart = copy_dir / "app-chart"

    def render(values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "v.yaml"
        path.write_text(yaml.safe_dump(values))
        return helm(helm_bin, "template", "demo", str(chart), "-f", str(path))

    refused = render({"replicaCount": 2})
    assert refused.returncode != 0 and "redis.url and redis.passwordSecret" in refused.stderr
    redis = {"url": "rediss://redis.example:6380", "passwordSecret": "redis-auth"}
    shared = render({"replicaCount": 3, "repairy-gateway": {"redis": redis}})
    assert shared.returncode == 0, shared.stderr
    (deployment,) = [d for d in yaml.safe_load_all(shared.stdout)
                     if d and d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 3
    opted_out = render({"replicaCount": 2,
                        "repairy-gateway": {"redis": {"allowUnsharedReplicas": True}}})
    assert opted_out.returncode == 0, opted_out.stderr
    template = chart / "templates" / "deployment.yaml"
    text = template.read_text()
    template.write_text(text.replace('"replicas" .Values.replicaCount "autoscaling" false', ""))
    missing = render({})
    assert missing.returncode != 0 and '"replicas"' in missing.stderr
    template.write_text(text.replace('"autoscaling" false', '"autoscaling" true'))
    assert render({}).returncode != 0  # autoscaling: more than one pod, no Redis


def _leaf_paths(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, dict) and tree:
        out: set[str] = set()
        for key, value in tree.items():
            out |= _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix}


@pytest.mark.unit
def test_helm_templates_reference_only_existing_values() -> None:
    """Every .Values.x.y in the templates names a value that values.yaml defines."""
    values = load(CHART / "values.yaml")
    refs: set[str] = set()
    for tpl in (CHART / "templates").glob("*"):
        refs |= set(re.findall(r"\.Values((?:\.[A-Za-z0-9_]+)+)", tpl.read_text()))
    assert refs, "no references found: the scan is broken"
    missing = []
    for ref in sorted(refs):
        node: Any = values
        for part in ref.strip(".").split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(ref)
                break
            node = node[part]
    assert missing == []


def test_helm_several_replicas_need_the_shared_store(helm_bin: str) -> None:
    """replicaCount > 1 or autoscaling without redis.url is refused (unless opted out); with
    it the pods get the store's settings and secrets, and no token file."""
    base = ["--set", "repairy.baseUrl=https://r.example", "--set", "credentials.appKey=k",
            "--set", "credentials.appSecret=s", "--set", "credentials.partnerId=p",
            "--set", "inbound.allowedCidrs={10.0.0.0/8}"]
    for extra in (["--set", "replicaCount=2"], ["--set", "autoscaling.enabled=true"]):
        result = subprocess.run([helm_bin, "template", "t", str(CHART), *base, *extra],
                                capture_output=True, text=True, check=False)
        assert result.returncode != 0
        assert "redis.url" in result.stderr
    result = subprocess.run([helm_bin, "template", "t", str(CHART), *base, "--set",
                             "replicaCount=2", "--set", "redis.url=redis://r:6379"],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "passwordSecret" in result.stderr  # password required
    render(helm_bin, *base, "--set", "replicaCount=2", "--set",
           "redis.allowUnsharedReplicas=true")
    result = subprocess.run([helm_bin, "template", "t", str(CHART), *base,
                             "-f", str(EXAMPLES / "values-full.yaml"),
                             "--set", "redis.cidrs=null"],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "redis.cidrs" in result.stderr
    single = render(helm_bin, *base)
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]  # cannot block drains
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"))
    env = by_kind(docs, "ConfigMap")["data"]
    assert env["GATEWAY_REDIS_URL"] == "rediss://redis.cache.svc:6380/0"
    assert env["GATEWAY_REDIS_PASSWORD_FILE"] == "/etc/repairy-gateway/redis/password"
    assert env["GATEWAY_STORE_KEY_FILE"] == "/etc/repairy-gateway/store-key/store-key"
    assert "GATEWAY_TOKEN_FILE" not in env
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    assert {"repairy-redis-password", "repairy-store-key", "repairy-redis-ca"} <= volumes
    assert by_kind(docs, "PodDisruptionBudget")


@pytest.mark.unit
def test_helm_readme_documents_every_value() -> None:
    """The chart README's values table names every leaf value of values.yaml."""
    readme = (CHART / "README.md").read_text()
    undocumented = [p for p in sorted(_leaf_paths(load(CHART / "values.yaml")))
                    if f"`{p}`" not in readme]
    assert undocumented == []


@pytest.mark.unit
def test_helm_chart_metadata() -> None:
    """Chart.yaml is apiVersion v2 and its appVersion is the package version."""
    from gateway import __version__

    chart = load(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == __version__
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert f'{{{{- define "repairy-gateway.appVersion" -}}}}{__version__}' in helpers


@pytest.mark.unit
def test_helm_readme_values_table_is_generated_from_values() -> None:
    """The chart README's values table is exactly what values.yaml's comments say."""
    readme = (CHART / "README.md").read_text()
    assert readme.endswith(values_table()), "regenerate with tests.helm_helpers.values_table()"


def test_helm_extension_points_render_valid_pods(helm_bin: str) -> None:
    """extraEnv/extraEnvFrom/extraVolumes/extraVolumeMounts (a private CA), pod labels and
    annotations, image digest, priority class, topology spread: all in the pod, all valid."""
    digest = "sha256:" + "ab" * 32
    extra = {
        "image": {"digest": digest}, "priorityClassName": "gateways",
        "podLabels": {"team": "bookings"}, "podAnnotations": {"note": "hi"},
        "extraEnv": [{"name": "GATEWAY_UPSTREAM_CA_FILE",
                      "value": "/etc/repairy-gateway/ca/ca.crt"}],
        "extraEnvFrom": [{"secretRef": {"name": "more-settings"}}],
        "extraVolumes": [{"name": "private-ca", "configMap": {"name": "corp-ca"}}],
        "extraVolumeMounts": [{"name": "private-ca", "mountPath": "/etc/repairy-gateway/ca",
                               "readOnly": True}],
    }
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"), *_set_json(extra))
    k8s_validate(docs)
    pod = by_kind(docs, "Deployment")["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["image"].endswith(f":0.1.0@{digest}")
    assert pod["spec"]["priorityClassName"] == "gateways"
    assert pod["metadata"]["labels"]["team"] == "bookings"
    assert pod["metadata"]["annotations"]["note"] == "hi"
    assert {"name": "GATEWAY_UPSTREAM_CA_FILE", "value": "/etc/repairy-gateway/ca/ca.crt"} in c[
        "env"]
    assert {"secretRef": {"name": "more-settings"}} in c["envFrom"]
    assert any(e.get("configMapRef") for e in c["envFrom"])  # the settings stay
    assert "private-ca" in {v["name"] for v in pod["spec"]["volumes"]}
    assert "/etc/repairy-gateway/ca" in {m["mountPath"] for m in c["volumeMounts"]}
    assert pod["spec"]["topologySpreadConstraints"]


def _set_json(values: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def test_helm_probes_are_named_and_the_startup_budget_is_a_value(helm_bin: str) -> None:
    """The start-up probe asks /startz (the gateway has tried: never a restart loop on a
    refused configuration), readiness /readyz, liveness /healthz; the budget is a value."""
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-standalone.yaml"),
                  "--set", "startupProbe.budgetSeconds=61", "--set",
                  "startupProbe.periodSeconds=10", "--set", "livenessProbe.periodSeconds=7")
    (c,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/startz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 61
    assert c["startupProbe"]["failureThreshold"] == 7  # ceil(61 / 10)
    assert c["livenessProbe"]["periodSeconds"] == 7
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-standalone.yaml"),
                  "--set", "startupProbe.enabled=false")
    (c,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "startupProbe" not in c and "readinessProbe" in c


def test_helm_pdb_only_where_it_cannot_block_a_drain_with_max_unavailable(
        helm_bin: str) -> None:
    single = ["-f", str(EXAMPLES / "values-standalone.yaml"), "--set", "replicaCount=1"]
    assert not [d for d in render(helm_bin, *single) if d["kind"] == "PodDisruptionBudget"]
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"),
                  "--set", "podDisruptionBudget.maxUnavailable=25%")
    spec = by_kind(docs, "PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == "25%" and "minAvailable" not in spec
    k8s_validate(docs)


def test_helm_service_monitor_takes_scrape_timeout_and_relabelings(helm_bin: str) -> None:
    relabel = [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"),
                  "--set", "metrics.serviceMonitor.scrapeTimeout=10s",
                  *_set_json({"metrics.serviceMonitor.relabelings": relabel,
                              "metrics.serviceMonitor.metricRelabelings": [
                                  {"action": "drop", "regex": "python_.*",
                                   "sourceLabels": ["__name__"]}]}))
    (endpoint,) = by_kind(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scrapeTimeout"] == "10s"
    assert endpoint["relabelings"] == relabel
    assert endpoint["metricRelabelings"][0]["action"] == "drop"


def test_helm_sidecar_mode_keeps_monitoring(helm_bin: str, tmp_path: Path) -> None:
    """In sidecar mode a PodMonitor (selecting the app's pods), the PrometheusRule and the
    dashboard are rendered; a PodMonitor without a selector is refused."""
    sub = "repairy-gateway.metrics"
    rendered = render_app_chart(
        helm_bin, tmp_path, "--set", f"{sub}.podMonitor.enabled=true",
        "--set", f"{sub}.podMonitor.selector.app=booking-app",
        "--set", f"{sub}.prometheusRule.enabled=true",
        "--set", f"{sub}.grafanaDashboard.enabled=true")
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    monitor = by_kind(docs, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"] == {"app": "booking-app"}
    assert monitor["podMetricsEndpoints"][0]["port"] == "gw-admin"
    assert by_kind(docs, "PrometheusRule")
    assert [d for d in docs if d["kind"] == "ConfigMap"
            and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert not [d for d in docs if d["kind"] == "Service"]  # still no standalone parts
    k8s_validate(docs)
    copy = tmp_path / "app-chart"
    result = helm(helm_bin, "template", "demo", str(copy), "--set",
                  f"{sub}.podMonitor.enabled=true")
    assert result.returncode != 0 and "podMonitor.selector" in result.stderr


def test_helm_grafana_dashboard_configmap_carries_the_shipped_dashboard(helm_bin: str) -> None:
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-standalone.yaml"),
                  "--set", "metrics.grafanaDashboard.enabled=true")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "config" / "grafana" / "repairy-gateway.json").read_text()
    assert json.loads(cm["data"]["repairy-gateway.json"]) == json.loads(shipped)
    assert (CHART / "dashboards" / "repairy-gateway.json").read_text() == shipped
    k8s_validate([cm])


def test_helm_egress_proxy_settings_secret_and_network_policy(helm_bin: str) -> None:
    """egressProxy: the setting and the password file reach the pod, and the NetworkPolicy
    lets it reach the proxy instead of the upstream."""
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-full.yaml"),
                  "--set", "egressProxy.url=http://gw@proxy.corp:3128",
                  "--set", "egressProxy.passwordSecret=proxy-pw",
                  "--set-json", 'egressProxy.cidrs=["10.9.0.0/16"]')
    k8s_validate(docs)
    env = by_kind(docs, "ConfigMap")["data"]
    assert env["GATEWAY_EGRESS_PROXY"] == "http://gw@proxy.corp:3128"
    assert env["GATEWAY_EGRESS_PROXY_PASSWORD_FILE"] == "/etc/repairy-gateway/egress-proxy/password"
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert "repairy-egress-proxy" in {v["name"] for v in pod["volumes"]}
    egress = by_kind(docs, "NetworkPolicy")["spec"]["egress"]
    cidrs = [b["ipBlock"]["cidr"] for rule in egress for b in rule.get("to", [])]
    assert "10.9.0.0/16" in cidrs and "203.0.113.0/24" not in cidrs
    assert {"port": 3128, "protocol": "TCP"} in [p for r in egress for p in r["ports"]]
    result = helm(helm_bin, "template", "t", str(CHART), "-f", str(EXAMPLES / "values-full.yaml"),
                  "--set", "egressProxy.url=http://proxy.corp:3128")
    assert result.returncode != 0 and "egressProxy.cidrs" in result.stderr


def test_helm_pod_labels_cannot_break_the_selector(helm_bin: str) -> None:
    docs = render(helm_bin, "-f", str(EXAMPLES / "values-standalone.yaml"), "--set-json",
                  'podLabels={"app.kubernetes.io/name":"other","team":"x"}')
    deployment = by_kind(docs, "Deployment")["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "repairy-gateway" and labels["team"] == "x"
    assert deployment["selector"]["matchLabels"].items() <= labels.items()


def test_helm_several_credentials_each_from_its_own_secret(helm_bin: str,
                                                          tmp_path: Path) -> None:
    """Further credential profiles: each Secret mounted apart, the settings naming them (and
    loading: every profile read from its files), an egress rule per profile with a base URL
    of its own, which the chart refuses to render without its CIDRs."""
    profiles: list[dict[str, Any]] = [{"name": "eu", "existingSecret": "repairy-eu",
                                       "required": True, "upstreamPort": 8443,
                 "baseUrl": "https://eu.repairy.example", "upstreamCidrs": ["198.51.100.0/24"]},
                {"name": "au_west", "existingSecret": "repairy-au",
                 "baseUrl": "https://au.repairy.example:9443", "upstreamCidrs": ["192.0.2.0/24"]}]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({**REQUIRED_VALUES, "credentials": {
        **REQUIRED_VALUES["credentials"], "profiles": profiles},
        "inbound": {"allowedCidrs": ["10.0.0.0/8"], "clientProfiles": []},
        "networkPolicy": {"enabled": True, "ingressFrom": [{"podSelector": {}}],
                          "upstreamCidrs": ["203.0.113.0/24"]}}))
    docs = render(helm_bin, "-f", str(values))
    env = by_kind(docs, "ConfigMap")["data"]
    assert env["GATEWAY_PROFILES"] == "eu,au_west"
    assert env["REPAIRY_PROFILE_EU_REQUIRED"] == "true"
    assert env["REPAIRY_PROFILE_EU_BASE_URL"] == "https://eu.repairy.example"
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["repairy-profile-eu"] == "repairy-eu"
    assert secrets["repairy-profile-au-west"] == "repairy-au"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/etc/repairy-gateway/profiles/eu", "/etc/repairy-gateway/profiles/au_west"} <= mounts
    egress = by_kind(docs, "NetworkPolicy")["spec"]["egress"]
    (own,) = [rule for rule in egress
              if {"ipBlock": {"cidr": "198.51.100.0/24"}} in rule.get("to", [])]
    assert own["ports"] == [{"port": 8443, "protocol": "TCP"}]
    (west,) = [rule for rule in egress
               if {"ipBlock": {"cidr": "192.0.2.0/24"}} in rule.get("to", [])]
    assert west["ports"] == [{"port": 9443, "protocol": "TCP"}]  # the port its baseUrl names
    # The rendered settings load, each profile from the files its Secret would hold.
    files = {}
    for name, value in env.items():
        if name.endswith("_FILE") and "/etc/repairy-gateway/" in value:
            path = tmp_path / value.strip("/").replace("/", "_")
            path.write_text(f"{name.lower()}-value")
            files[name] = str(path)
    from gateway.settings import load_settings
    loaded = load_settings({**{k: v for k, v in env.items() if "TOKEN_FILE" not in k},
                            **files, "GATEWAY_AUDIT_LOG": "off"})
    assert [(p.name, p.required) for p in loaded.profiles] == [
        ("default", True), ("eu", True), ("au_west", False)]
    assert loaded.profiles[2].partner.partner_id == (
        "repairy_profile_au_west_partner_id_file-value")
    # A profile with a base URL of its own needs its CIDRs under the NetworkPolicy.
    profiles[0] = {k: v for k, v in profiles[0].items() if k != "upstreamCidrs"}
    values.write_text(yaml.safe_dump({**yaml.safe_load(values.read_text()), "credentials": {
        **REQUIRED_VALUES["credentials"], "profiles": profiles}}))
    result = helm(helm_bin, "template", "demo", str(CHART), "-f", str(values))
    assert result.returncode != 0 and "credentials.profiles[eu].upstreamCidrs" in result.stderr
    # A name listed twice is refused (its volumes and variables would collide).
    twice = [{"name": "eu", "existingSecret": "a"}, {"name": "eu", "existingSecret": "b"}]
    values.write_text(yaml.safe_dump({**REQUIRED_VALUES, "credentials": {
        **REQUIRED_VALUES["credentials"], "profiles": twice}}))
    result = helm(helm_bin, "template", "demo", str(CHART), "-f", str(values))
    assert result.returncode != 0 and "eu is listed twice" in result.stderr
