"""The Kubernetes manifests (infra/k8s/) and the compose file (infra/docker-compose.yml), checked
offline: every role the runner knows is deployed, every manifest is valid against the
Kubernetes schemas (kubernetes-validate bundles them) or KEDA's CRD schemas, pods are hardened,
and metrics are reachable only where probes and Prometheus need them."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from workers.config import Settings
from workers.runtime.runner import ROLES, WEB

INFRA = Path(__file__).resolve().parents[2] / "infra"
#: The oldest Kubernetes still commonly run, and the newest the validator bundles.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
KEDA_SCHEMAS = json.loads((Path(__file__).with_name("schemas") / "keda-v1alpha1.json").read_text())

Doc = dict[str, Any]


def manifests() -> list[tuple[str, Doc]]:
    """Every document of every manifest file, with its file name."""
    return [
        (path.name, doc)
        for path in sorted((INFRA / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def compose() -> Doc:
    doc: Doc = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    return doc


def pod_specs() -> Iterator[tuple[str, Doc]]:
    for _, doc in manifests():
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def worker_roles(command: list[str]) -> list[str]:
    """The roles of a ``nudge worker ROLE... --option`` command line (none for another)."""
    if not command or command[0] != "worker":
        return []
    return [word for word in command[1:] if not word.startswith("-") and not word.isdigit()]


def strict(schema: Any) -> Any:
    """``schema`` refusing unknown fields, as the API server does for a structural schema
    with field validation ``Strict`` (kubectl's default): a misspelt field must fail."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_every_role_the_runner_knows_runs_in_kubernetes_and_in_compose() -> None:
    in_kubernetes = {
        role
        for _, spec in pod_specs()
        for c in spec["containers"]
        for role in worker_roles(c.get("args", []))
    }
    in_compose = {
        role
        for service in compose()["services"].values()
        for role in worker_roles(service.get("command", []))
    }
    assert in_kubernetes == set(ROLES), f"Kubernetes runs {sorted(in_kubernetes)}"
    assert in_compose == set(ROLES), f"compose runs {sorted(in_compose)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, doc in manifests():
        # KEDA's objects are checked against its CRD schemas below; the RabbitMQ Messaging
        # Topology Operator's users and permissions against the topology in code
        # (tests/unit/test_topology_file.py): the validator bundles neither CRD.
        if doc["apiVersion"].startswith(("keda.sh/", "rabbitmq.com/")):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            first = str(exc).splitlines()[0]  # the rest is the whole schema
            raise AssertionError(f"{name} {doc['kind']}: {first}") from exc
        checked += 1
    assert checked >= 8


def test_the_keda_objects_are_valid_against_kedas_crd_schemas() -> None:
    keda = [(name, doc) for name, doc in manifests() if doc["apiVersion"] == "keda.sh/v1alpha1"]
    assert sorted(doc["kind"] for _, doc in keda) == ["ScaledObject", "TriggerAuthentication"]
    for name, doc in keda:
        schema = strict(copy.deepcopy(KEDA_SCHEMAS[doc["kind"]]))
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}: {exc.message}") from exc


def test_a_misspelt_field_fails_the_keda_schema_check() -> None:
    [scaled] = [doc for _, doc in manifests() if doc["kind"] == "ScaledObject"]
    wrong = copy.deepcopy(scaled)
    wrong["spec"]["maxReplicas"] = wrong["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(wrong, strict(KEDA_SCHEMAS["ScaledObject"]))


def test_keda_scales_dispatch_on_the_depth_of_nudge_due_with_the_url_from_a_secret() -> None:
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}
    [scaled] = [doc for (kind, _), doc in docs.items() if kind == "ScaledObject"]
    target = scaled["spec"]["scaleTargetRef"]["name"]
    deployment = docs[("Deployment", target)]
    assert worker_roles(deployment["spec"]["template"]["spec"]["containers"][0]["args"]) == [
        "dispatch"
    ]
    assert "replicas" not in deployment["spec"], "the ScaledObject owns the replica count"
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    [due] = [t for t in scaled["spec"]["triggers"] if t["metadata"]["queueName"] == "nudge.due"]
    assert due["type"] == "rabbitmq"
    assert due["metadata"]["mode"] == "QueueLength"
    assert int(due["metadata"]["value"]) > 0
    for trigger in scaled["spec"]["triggers"]:
        auth = docs[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
        [ref] = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "host"
        secret = docs[("Secret", ref["name"])]
        assert secret["stringData"][ref["key"]].startswith("amqp://")


def test_every_container_runs_unprivileged_on_a_read_only_root_filesystem() -> None:
    seen = 0
    for name, spec in pod_specs():
        pod = spec.get("securityContext", {})
        mounts_tmp = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            where = f"{name}/{c['name']}"
            own = c.get("securityContext", {})
            assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert own.get("runAsUser", pod.get("runAsUser", 0)) != 0, where
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("readOnlyRootFilesystem") is True, where
            assert own.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not own.get("capabilities", {}).get("add"), where
            assert own.get("privileged", False) is False, where
            seccomp = own.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert [m["name"] for m in tmp] in ([n] for n in mounts_tmp), f"{where}: no /tmp"
            assert "limits" in c.get("resources", {}), where
            seen += 1
        assert spec.get("automountServiceAccountToken") is False, name
    assert seen >= 9


def test_metrics_are_reachable_by_probes_and_prometheus_only() -> None:
    assert not {doc["kind"] for _, doc in manifests()} & {"Ingress"}
    # the one Service is the web role's, on its http port: nothing needs the metrics port
    # from outside the pod
    services = [doc for _, doc in manifests() if doc["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["nudge-web"]
    assert [p["targetPort"] for p in services[0]["spec"]["ports"]] == ["http"]
    config = next(doc for _, doc in manifests() if doc["kind"] == "ConfigMap")["data"]
    port = int(config["NUDGE_METRICS_PORT"])
    for name, spec in pod_specs():
        for c in spec.get("initContainers", []):
            assert not c.get("ports"), f"{name}/{c['name']} serves nothing"
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            if not worker_roles(c.get("args", [])):
                assert not c.get("ports"), f"{where} serves nothing"
                continue
            served = [
                p for p in c["ports"] if p["name"] != "http" or worker_roles(c["args"]) == [WEB]
            ]
            assert served == [{"name": "metrics", "containerPort": port}] or served == [
                {"name": "http", "containerPort": 8080},
                {"name": "metrics", "containerPort": port},
            ], where
            assert [p["name"] for p in c["ports"]] == [p["name"] for p in served], where
            live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
            assert live == {"path": "/healthz", "port": "metrics"}, where
            assert ready == {"path": "/readyz", "port": "metrics"}, where
    for _, doc in manifests():
        if doc["kind"] == "Deployment":
            notes = doc["spec"]["template"]["metadata"]["annotations"]
            assert notes["prometheus.io/scrape"] == "true"
            assert int(notes["prometheus.io/port"]) == port


def test_the_compose_workers_are_hardened_and_only_the_web_role_publishes_a_port() -> None:
    services = compose()["services"]
    workers = {n: s for n, s in services.items() if worker_roles(s.get("command", []))}
    assert len(workers) >= 4
    for name, service in workers.items():
        if worker_roles(service["command"]) == [WEB]:  # its http port, on loopback only
            assert service["ports"] == ["127.0.0.1:8080:8080"], name
        else:
            assert "ports" not in service, f"{name} publishes a port"
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not str(service["user"]).startswith("0"), name
        assert any(t.startswith("/tmp") for t in service["tmpfs"]), name
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert service["environment"]["NUDGE_METRICS_HOST"] == "127.0.0.1", name
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_setting_the_deployments_pass_exists() -> None:
    # a removed or misspelt NUDGE_* variable would be ignored, or refused at start
    known = {f"NUDGE_{name.upper()}" for name in Settings.model_fields}
    given: dict[str, set[str]] = {}
    for name, doc in manifests():
        values = {**doc.get("data", {}), **doc.get("stringData", {})}
        given.setdefault(name, set()).update(k for k in values if k.startswith("NUDGE_"))
    for service in compose()["services"].values():
        given.setdefault("docker-compose.yml", set()).update(
            k for k in service.get("environment", {}) if k.startswith("NUDGE_")
        )
    for where, names in given.items():
        assert names <= known, f"{where}: unknown settings {sorted(names - known)}"
