"""deploy/kustomize/ rendered by a real kustomize (``kubectl kustomize``, kubectl from the npm
registry's Lambda-layer package, as for helm) and checked against the Kubernetes schemas the
chart's tests use: the standalone base, the sidecar component patching a user's Deployment,
and the fleet overlay with Redis."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.tools import require_kubectl

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kustomize"
K8S_VERSION = "1.35.0"


@pytest.fixture(scope="module")
def kubectl() -> str:
    return require_kubectl()


def render(kubectl: str, path: Path) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind
                and (name is None or d["metadata"]["name"] == name)]
    return found


def probes(container: dict[str, Any]) -> dict[str, str]:
    return {kind: container[kind]["httpGet"]["path"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_kustomize_base_is_a_hardened_standalone_gateway(kubectl: str) -> None:
    docs = render(kubectl, KUSTOMIZE / "base")
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    (gateway,) = pod["containers"]
    assert probes(gateway) == {"startupProbe": "/startz", "readinessProbe": "/readyz",
                               "livenessProbe": "/healthz"}
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    config = one(docs, "ConfigMap")
    assert gateway["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["GATEWAY_CLIENT_KEYS_FILE"]  # listening on 0.0.0.0 needs keys
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {
        "repairy-credentials", "repairy-gateway-client-keys"}
    service = one(docs, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_kustomize_sidecar_component_patches_only_the_labelled_deployments(
        kubectl: str, tmp_path: Path) -> None:
    """A user's kustomization with two Deployments, one labelled: the gateway is added to
    that one as a native sidecar (probes, the credentials volume, loopback listener), the
    pod's own settings (enableServiceLinks) are left alone, and the other is untouched."""
    shutil.copytree(KUSTOMIZE, tmp_path / "kustomize")
    app = tmp_path / "app"
    app.mkdir()
    (app / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["apps.yaml"], "components": ["../kustomize/components/sidecar"]}))

    def deployment(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "labels": labels},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": {
                             "enableServiceLinks": True,
                             "containers": [{"name": "app", "image": f"{name}:1"}]}}}}

    (app / "apps.yaml").write_text(yaml.safe_dump_all([
        deployment("booking-app", {"repairy-gateway/sidecar": "true"}),
        deployment("other-app", {})]))
    docs = render(kubectl, app)
    booking = one(docs, "Deployment", "booking-app")["spec"]["template"]["spec"]
    (sidecar,) = booking["initContainers"]
    assert sidecar["name"] == "repairy-gateway" and sidecar["restartPolicy"] == "Always"
    assert probes(sidecar) == {"startupProbe": "/startz", "readinessProbe": "/readyz",
                               "livenessProbe": "/healthz"}
    assert [c["name"] for c in booking["containers"]] == ["app"]
    assert booking["enableServiceLinks"] is True  # the pod is the user's
    assert {v["name"] for v in booking["volumes"]} == {"repairy-credentials", "repairy-state"}
    config = one(docs, "ConfigMap")
    assert sidecar["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["GATEWAY_LISTEN"] == "127.0.0.1:8080"
    other = one(docs, "Deployment", "other-app")["spec"]["template"]["spec"]
    assert "initContainers" not in other and "volumes" not in other


def test_kustomize_fleet_overlay_shares_one_token_through_a_non_evicting_redis(
        kubectl: str) -> None:
    docs = render(kubectl, KUSTOMIZE / "overlays" / "fleet")
    gateway = one(docs, "Deployment", "repairy-gateway")
    assert gateway["spec"]["replicas"] == 2
    config = one(docs, "ConfigMap")
    assert config["data"]["GATEWAY_REDIS_URL"] == "redis://repairy-gateway-redis:6379/0"
    assert config["data"]["GATEWAY_REDIS_PASSWORD_FILE"] == "/etc/repairy-gateway/redis/password"
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/repairy-gateway/redis" in mounts and "/etc/repairy-gateway/credentials" in mounts
    redis = one(docs, "Deployment", "repairy-gateway-redis")
    command = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--maxmemory-policy noeviction" in command and "--requirepass" in command
    service = one(docs, "Service", "repairy-gateway")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= redis_labels.items()
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= (
        gateway["spec"]["template"]["metadata"]["labels"].items())


def test_kustomize_the_sidecar_steps_in_the_deployment_guide_render(kubectl: str,
                                                                     tmp_path: Path) -> None:
    """docs/deployment.md's kustomization for a sidecar, as written (the component's path
    pointed at a copy of deploy/): it renders, with the URL and the image it sets."""
    guide = (ROOT / "docs" / "deployment.md").read_text()
    section = guide.split("## Kubernetes without Helm: kustomize", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    text = "\n".join(line[3:] for line in block.splitlines())  # the list's indent
    shutil.copytree(ROOT / "deploy", tmp_path / "repairy-gateway" / "deploy")
    app = tmp_path / "app"
    app.mkdir()
    (app / "kustomization.yaml").write_text(text.replace("../path/to/repairy-gateway",
                                                         "../repairy-gateway"))
    (app / "deployment.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "booking-app", "labels": {"repairy-gateway/sidecar": "true"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "b"}},
                 "template": {"metadata": {"labels": {"app": "b"}}, "spec": {
                     "containers": [{"name": "app", "image": "booking-app:1"}]}}}}))
    docs = render(kubectl, app)
    config = one(docs, "ConfigMap")
    assert config["data"]["REPAIRY_BASE_URL"] == "https://partners.repairy.example"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"].startswith("registry.example/repairy-gateway:")


def test_kustomize_profile_component_adds_a_credential_from_its_own_secret(
        kubectl: str, tmp_path: Path) -> None:
    """The profile component on the fleet overlay: the profile's Secret mounted beside the
    default's, its settings merged into the gateway's ConfigMap."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deploy/kustomize/overlays/fleet]\n"
        "components: [deploy/kustomize/components/profile-eu]\n")
    docs = render(kubectl, tmp_path)
    pod = one(docs, "Deployment", "repairy-gateway")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["repairy-credentials"] == "repairy-credentials"
    assert secrets["repairy-profile-eu"] == "repairy-credentials-eu"
    (container,) = pod["containers"]
    assert "/etc/repairy-gateway/profiles/eu" in {m["mountPath"]
                                                  for m in container["volumeMounts"]}
    (data,) = [d["data"] for d in docs if d["kind"] == "ConfigMap"
               and "GATEWAY_LISTEN" in d.get("data", {})]
    assert data["GATEWAY_PROFILES"] == "eu"
    assert data["REPAIRY_PROFILE_EU_APP_KEY_FILE"] == "/etc/repairy-gateway/profiles/eu/app-key"
    assert data["GATEWAY_REDIS_URL"]  # the fleet's settings kept (merged, not replaced)
