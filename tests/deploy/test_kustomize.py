"""The Kubernetes manifests: every overlay renders, validates, and wires the loop as DESIGN.md says.

    .venv/bin/python -m pytest -q tests/deploy/test_kustomize.py

Core objects are validated with kubernetes-validate (strict: unknown fields are errors)
against the Kubernetes API of K8S_VERSION. Strimzi objects are validated against the
openAPIV3Schema of Strimzi's own CRDs in ../shared/strimzi-crds, made strict the same way
the API server's strict field validation is: a field the schema does not name is an error.
"""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DASHBOARD,
    K8S,
    OVERLAYS,
    STRIMZI_CRDS,
    K8S_VERSION,
    by_generated_name,
    container_env,
    containers,
    get,
    image_env,
    of_kind,
    pod_spec,
    render,
    rlhf_containers,
)

from rlhf.contracts import Settings

STRIMZI_GROUP = "kafka.strimzi.io"
SECRET_KEYS = {"RLHF_API_KEYS": "api-keys", "RLHF_ADMIN_KEY": "admin-key", "RLHF_RESPONSE_ID_SECRET": "response-id-secret"}
ADMIN_CLIENT = {"rlhf-loop/admin-client": "true"}
KAFKA_CLIENT = {"rlhf-loop/kafka-client": "true"}
SERVICE_LABELS = {"app.kubernetes.io/name": "rlhf-loop", "app.kubernetes.io/component": "service"}
TRAINER_LABELS = {"app.kubernetes.io/name": "rlhf-loop", "app.kubernetes.io/component": "trainer"}


def env_of(objs, container) -> dict[str, str]:
    return container_env(objs, container, image_env())


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings the process would build from this environment (secrets left out)."""
    plain = {k[len("RLHF_"):].lower(): v for k, v in env.items() if k.startswith("RLHF_") and not v.startswith("secret:")}
    return Settings(**plain)


def service(objs):
    (c,) = containers(get(objs, "Deployment", "rlhf-service"))
    return get(objs, "Deployment", "rlhf-service"), c


def trainer(objs):
    (c,) = containers(get(objs, "Deployment", "rlhf-trainer"))
    return get(objs, "Deployment", "rlhf-trainer"), c


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# ---------------------------------------------------------------------------- what is rendered


def test_overlays_and_every_manifest_are_used():
    """dev and prod exist, and every file under k8s/ is referenced by a kustomization."""
    assert {"dev", "prod"} <= set(OVERLAYS)
    referenced = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        paths = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        for generator in (*k.get("configMapGenerator", []), *k.get("secretGenerator", [])):
            paths += [*generator.get("envs", []), *generator.get("files", [])]
        referenced |= {(kustomization.parent / p).resolve() for p in paths}
        referenced.add(kustomization.resolve())
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    assert not files - referenced, f"not used by any kustomization: {sorted(map(str, files - referenced))}"
    assert (K8S / "base").resolve() in referenced


# ---------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_kubernetes_api(overlay):
    core = [o for o in render(overlay) if not o["apiVersion"].startswith(STRIMZI_GROUP)]
    assert core
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {e}")


def test_kubernetes_validation_rejects_an_unknown_field():
    _, c = service(render("dev"))
    deployment = copy.deepcopy(get(render("dev"), "Deployment", "rlhf-service"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = c["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def strict(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema that rejects fields it does not name.

    Structural schemas prune unknown fields silently; `kubectl apply` (strict field
    validation) reports them. x-kubernetes-preserve-unknown-fields keeps a map open
    (e.g. Kafka `config`), nullable admits null, int-or-string admits both.
    """
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


@pytest.fixture(scope="module")
def strimzi_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, from every CRD file in ../shared/strimzi-crds."""
    if not STRIMZI_CRDS.is_dir():
        pytest.skip(f"Strimzi CRDs not found at {STRIMZI_CRDS} (CI keeps a copy beside the clone); "
                    "the prod overlay's Kafka objects are not schema-checked on this machine")
    schemas = {}
    for path in sorted(STRIMZI_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    assert schemas, f"no CRDs in {STRIMZI_CRDS}"
    return schemas


def strimzi_errors(obj: dict, schemas) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key not in schemas:
        return [f"{obj['kind']}/{obj['metadata']['name']}: no served CRD version for {key} (have {sorted(schemas)})"]
    validator = jsonschema.Draft4Validator(schemas[key])
    return [f"{obj['kind']}/{obj['metadata']['name']} at {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_objects_validate_against_strimzi_crds(overlay, strimzi_schemas):
    for obj in render(overlay):
        if obj["apiVersion"].startswith(STRIMZI_GROUP):
            assert not strimzi_errors(obj, strimzi_schemas), strimzi_errors(obj, strimzi_schemas)
            # ObjectMeta is not in the CRD schema; the API server checks the name like this.
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", obj["metadata"]["name"])


def test_strimzi_validation_rejects_typos_and_bad_values(strimzi_schemas):
    topic = copy.deepcopy(of_kind(render("prod"), "KafkaTopic")[0])
    topic["spec"]["partitons"] = 3
    assert any("partitons" in e for e in strimzi_errors(topic, strimzi_schemas))
    pool = copy.deepcopy(of_kind(render("prod"), "KafkaNodePool")[0])
    pool["spec"]["roles"] = ["zookeeper"]
    assert strimzi_errors(pool, strimzi_schemas)


# ---------------------------------------------------------------------------- the service


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_ports_and_rollout(overlay):
    objs = render(overlay)
    deployment, c = service(objs)
    s = settings_from(env_of(objs, c))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": s.port, "admin": s.admin_port}
    assert c["args"] == ["serve"]
    probes = {k: (c[k]["httpGet"]["path"], c[k]["httpGet"]["port"]) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/readyz", "http"), "livenessProbe": ("/livez", "http"), "readinessProbe": ("/readyz", "http")}
    # the startup budget is what a slow model load gets before liveness can restart it
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget_cover_the_service(overlay):
    objs = render(overlay)
    deployment, _ = service(objs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rlhf-service"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels)
    if overlay == "prod":
        assert hpa["spec"]["minReplicas"] >= 2, "prod keeps a second replica through a node drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_public_service_exposes_only_the_api_port(overlay):
    objs = render(overlay)
    deployment, c = service(objs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    exposed = {}
    for svc in of_kind(objs, "Service"):
        if selects({"matchLabels": svc["spec"]["selector"]}, labels):
            for p in svc["spec"]["ports"]:
                exposed.setdefault(named.get(p["targetPort"], p["targetPort"]), []).append(svc)
    assert set(exposed) == {named["http"], named["admin"]}
    for svc in exposed[named["admin"]]:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "the admin port is never exposed outside the cluster"
        assert svc["spec"]["clusterIP"] == "None", "headless: a pin is per replica, so admin clients address each one"
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["admin"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_secret_key_refs(overlay):
    objs = render(overlay)
    _, c = service(objs)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert {k: r["key"] for k, r in refs.items()} == SECRET_KEYS
    secrets = of_kind(objs, "Secret")
    if overlay == "prod":
        assert not secrets, "prod commits no Secret: rlhf-secrets is created in the cluster (docs/deploy.md)"
        assert {r["name"] for r in refs.values()} == {"rlhf-secrets"}
    else:
        secret = by_generated_name(objs, "Secret", "rlhf-secrets")
        assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
        assert set(SECRET_KEYS.values()) <= set(secret["data"])


# ---------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_a_single_recreated_pod(overlay):
    objs = render(overlay)
    deployment, c = trainer(objs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert c["args"] == ["train"]
    port = settings_from(env_of(objs, c)).trainer_metrics_port
    assert port and c["ports"] == [{"name": "metrics", "containerPort": port}], "its one port: Prometheus metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_service_and_the_trainer(overlay):
    """The kubernetes_sd annotation convention: scrape, port, path, on the pod template."""
    objs = render(overlay)
    for (deployment, c), port in ((service(objs), "http"), (trainer(objs), "metrics")):
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(named[port]),
                               "prometheus.io/path": "/metrics"}, deployment["metadata"]["name"]


def test_prod_trainer_gets_a_gpu():
    objs = render("prod")
    deployment, c = trainer(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    spec = pod_spec(deployment)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert settings_from(env_of(objs, c)).device == "cuda"
    _, svc = service(objs)
    assert settings_from(env_of(objs, svc)).device == "cpu"


def test_dev_runs_on_cpu_only():
    objs = render("dev")
    for w, c in rlhf_containers(objs):
        assert "nvidia" not in yaml.safe_dump(w), f"{w['metadata']['name']} still asks for a GPU in dev"
        assert settings_from(env_of(objs, c)).device == "cpu"


# ---------------------------------------------------------------------------- shared state


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_trainer_share_the_policy_store_claim(overlay):
    objs = render(overlay)
    claims = {}
    for w, c in rlhf_containers(objs):
        store = settings_from(env_of(objs, c)).policy_dir
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(store)]
        assert not mount.get("readOnly"), "the first pod to start writes version 0 into the store"
        claims[w["metadata"]["name"]] = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert set(claims) == {"rlhf-service", "rlhf-trainer"}
    assert len(set(claims.values())) == 1, claims
    pvc = get(objs, "PersistentVolumeClaim", claims["rlhf-service"])
    # dev is one node, where ReadWriteOnce already lets both pods mount it
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_dir_is_writable_and_holds_the_spool(overlay):
    objs = render(overlay)
    for w, c in rlhf_containers(objs):
        s = settings_from(env_of(objs, c))
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert c["securityContext"]["readOnlyRootFilesystem"], "writes go to volumes only"
        for path in (str(s.state_dir), "/tmp", "/home/rlhf"):
            assert path in mounts and not mounts[path].get("readOnly"), f"{w['metadata']['name']}: {path} must be a writable volume"
        state = volumes[mounts[str(s.state_dir)]["name"]]
        if w["metadata"]["name"] == "rlhf-service":
            limit = state["emptyDir"]["sizeLimit"]
            assert limit.endswith("Gi") and int(limit[:-2]) * 2**30 > s.spool_max_bytes, "a full spool must not evict the pod"
        else:
            assert get(objs, "PersistentVolumeClaim", state["persistentVolumeClaim"]["claimName"])["spec"]["accessModes"] == ["ReadWriteOnce"]


# ---------------------------------------------------------------------------- pods in general


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay):
    objs = render(overlay)
    settings_env = {f"RLHF_{name.upper()}" for name in Settings.model_fields}
    for w, c in rlhf_containers(objs):
        spec = pod_spec(w)
        assert spec["serviceAccountName"] == "rlhf" and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        # Service links would put e.g. RLHF_ADMIN_PORT=tcp://... into our settings namespace.
        assert spec["enableServiceLinks"] is False
        threads = {e["name"]: e["value"] for e in c["env"] if "value" in e}.get("OMP_NUM_THREADS")
        assert threads == str(max(1, int(c["resources"]["requests"]["cpu"]))), "torch sizes its pool by the node, not the pod"
    # ... and no Service name would produce one even where links are on
    for svc in of_kind(objs, "Service"):
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        link_vars = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        assert not link_vars & settings_env, f"Service {svc['metadata']['name']} shadows a setting: {link_vars & settings_env}"
    sa = get(objs, "ServiceAccount", "rlhf")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay):
    for w in render(overlay):
        if w["kind"] in {"Deployment", "StatefulSet"}:
            for c in containers(w):
                name, _, tag = c["image"].rpartition(":")
                assert name and tag and tag != "latest", f"{w['metadata']['name']}: image {c['image']} is not pinned"


# ---------------------------------------------------------------------------- network policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_keeps_the_admin_api_private(overlay):
    objs = render(overlay)
    deployment, c = service(objs)
    s = settings_from(env_of(objs, c))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert policies and all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    rules = [r for p in policies for r in p["spec"]["ingress"]]
    assert all(r.get("ports") for r in rules), "a rule without ports would open every port"
    public = [r for r in rules if "from" not in r]
    assert [p["port"] for r in public for p in r["ports"]] == [s.port]
    admin = [r for r in rules if any(p["port"] == s.admin_port for p in r["ports"])]
    assert admin, "nothing may reach the admin port"
    for r in admin:
        assert r["from"] == [{"podSelector": {"matchLabels": ADMIN_CLIENT}}], "admin: only labelled pods of this namespace"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_opens_only_the_trainers_metrics_port_to_prometheus(overlay):
    objs = render(overlay)
    deployment, c = trainer(objs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert policies and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    rules = [r for p in policies for r in p["spec"]["ingress"]]
    prometheus = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    port = settings_from(env_of(objs, c)).trainer_metrics_port
    assert rules == [{"from": [prometheus], "ports": [{"port": port, "protocol": "TCP"}]}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_dashboard_ships_as_a_labelled_configmap(overlay):
    (cm,) = [o for o in of_kind(render(overlay), "ConfigMap") if o["metadata"]["name"] == "rlhf-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "what Grafana's dashboard sidecar looks for"
    assert cm["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert json.loads(cm["data"][DASHBOARD.name])["uid"] == "rlhf-loop"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_clients_are_labelled(overlay):
    for w, _ in rlhf_containers(render(overlay)):
        assert selects({"matchLabels": KAFKA_CLIENT}, w["spec"]["template"]["metadata"]["labels"])


# ---------------------------------------------------------------------------- kafka


def test_dev_broker_is_the_bootstrap_address():
    objs = render("dev")
    _, c = service(objs)
    s = settings_from(env_of(objs, c))
    assert s.create_topics is True, "dev has no topic operator: the code creates its topics"
    host, port = s.kafka_bootstrap_servers.split(":")
    svc = get(objs, "Service", host)
    assert [p["port"] for p in svc["spec"]["ports"]] == [int(port)]
    broker = get(objs, "StatefulSet", host)
    assert broker["spec"]["replicas"] == 1 and selects({"matchLabels": svc["spec"]["selector"]}, broker["spec"]["template"]["metadata"]["labels"])
    (kafka,) = containers(broker)
    env = {e["name"]: e["value"] for e in kafka["env"]}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert f"PLAINTEXT://{s.kafka_bootstrap_servers}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert pod_spec(broker)["enableServiceLinks"] is False, "the image would read KAFKA_* link variables as broker config"
    (policy,) = [p for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], broker["spec"]["template"]["metadata"]["labels"])]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": KAFKA_CLIENT}}], "ports": [{"port": int(port), "protocol": "TCP"}]}]


def test_prod_kafka_is_strimzi_kraft_with_node_pools():
    objs = render("prod")
    (kafka,) = of_kind(objs, "Kafka")
    assert kafka["metadata"]["annotations"] == {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"}
    pools = of_kind(objs, "KafkaNodePool")
    assert all(p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for p in pools)
    roles = {r: sum(p["spec"]["replicas"] for p in pools if r in p["spec"]["roles"]) for r in ("controller", "broker")}
    assert roles["controller"] % 2 == 1 and roles["controller"] >= 3, "a quorum that survives one loss"
    assert roles["broker"] >= 3, "replication factor 3 needs three brokers"
    config = kafka["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2 and config["default.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False
    assert "topicOperator" in kafka["spec"]["entityOperator"]


def test_prod_settings_point_at_strimzi():
    objs = render("prod")
    (kafka,) = of_kind(objs, "Kafka")
    _, c = service(objs)
    s = settings_from(env_of(objs, c))
    (listener,) = [x for x in kafka["spec"]["kafka"]["listeners"] if x["type"] == "internal" and not x["tls"]]
    assert s.kafka_bootstrap_servers == f"{kafka['metadata']['name']}-kafka-bootstrap:{listener['port']}"
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert listener["networkPolicyPeers"] == [{"podSelector": {"matchLabels": KAFKA_CLIENT}}]
    assert s.create_topics is False, "the KafkaTopic objects own the topics"


def test_prod_topics():
    objs = render("prod")
    (kafka,) = of_kind(objs, "Kafka")
    _, c = service(objs)
    s = settings_from(env_of(objs, c))
    topics = {t["spec"]["topicName"]: t for t in of_kind(objs, "KafkaTopic")}
    assert set(topics) == {s.topic_interactions, s.topic_feedback, s.topic_policy_updates, s.topic_dlq}
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert t["spec"]["replicas"] == 3 and t["spec"]["config"]["min.insync.replicas"] == 2
    interactions, feedback = topics[s.topic_interactions], topics[s.topic_feedback]
    # keyed by response_id: equal counts put a response and its votes on the same partition
    assert interactions["spec"]["partitions"] == feedback["spec"]["partitions"] == s.topic_partitions
    assert topics[s.topic_policy_updates]["spec"]["partitions"] == 1, "one total order of versions"
    retention = {name: t["spec"]["config"]["retention.ms"] for name, t in topics.items()}
    assert min(retention[s.topic_interactions], retention[s.topic_feedback]) >= 24 * 3600 * 1000 > s.late_vote_window_s * 1000
    assert retention[s.topic_dlq] >= max(retention.values()), "dead letters outlive what they came from"
