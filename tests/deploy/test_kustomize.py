"""The Kubernetes manifests: every overlay renders, validates, and wires the loop as DESIGN.md says.

    .venv/bin/python -m pytest -q tests/deploy/test_kustomize.py

Core objects are validated with kubernetes-validate (strict: unknown fields are errors)
against the Kubernetes API of K8S_VERSION. Strimzi objects (Kafka, KafkaNodePool,
KafkaTopic, KafkaUser) and Kubeflow Trainer objects (TrainJob, ClusterTrainingRuntime) are
validated against the openAPIV3Schema of their own CRDs in ../shared/strimzi-crds and
../shared/kubeflow-trainer-crds, made strict the same way the API server's strict field
validation is: a field the schema does not name is an error. The CRDs' CEL rules are not
evaluated (test_trainjob.py checks the TrainJob's by hand). The Kafka client side of prod
(SASL, TLS, ACLs) is in test_kafka_auth.py, the service's spool in test_spool.py, the
TrainJob in test_trainjob.py.
"""

from __future__ import annotations

import copy
import json
import re
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CRD_DIRS,
    DASHBOARD,
    K8S,
    K8S_VERSION,
    OVERLAYS,
    by_generated_name,
    container_env,
    containers,
    crd_errors,
    get,
    image_env,
    of_kind,
    pod_spec,
    render,
    rlhf_containers,
    running,
    workload,
    workloads,
)

from rlhf_loop.core.contracts import Settings

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
    """The service's StatefulSet and its container."""
    (c,) = containers(get(objs, "StatefulSet", "rlhf-service"))
    return get(objs, "StatefulSet", "rlhf-service"), c


def trainer(objs):
    """The single-pod trainer's Deployment and its container (0 replicas where a TrainJob trains)."""
    (c,) = containers(get(objs, "Deployment", "rlhf-trainer"))
    return get(objs, "Deployment", "rlhf-trainer"), c


def trainers(objs) -> list[tuple[dict, dict]]:
    """Every workload that runs `rlhf train` as rendered (the Deployment, or a TrainJob's pods)."""
    return [(w, c) for w, c in rlhf_containers(objs) if running(w) and "train" in c.get("args", [])]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# ---------------------------------------------------------------------------- what is rendered


def test_overlays_and_every_manifest_are_used():
    """dev, prod and prod-multinode exist, and every file under k8s/ is referenced by a kustomization."""
    assert {"dev", "prod", "prod-multinode"} <= set(OVERLAYS)
    referenced = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        paths = [*k.get("resources", []), *k.get("components", []), *k.get("configurations", []),
                 *(p["path"] for p in k.get("patches", []) if "path" in p)]
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
    core = [o for o in render(overlay) if o["apiVersion"].split("/")[0] not in CRD_DIRS]
    assert core
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {e}")


def test_kubernetes_validation_rejects_an_unknown_field():
    _, c = service(render("dev"))
    statefulset = copy.deepcopy(get(render("dev"), "StatefulSet", "rlhf-service"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = c["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_objects_validate_against_strimzi_crds(overlay):
    """Kafka, KafkaNodePool, KafkaTopic and KafkaUser (skipped, saying so, without ../shared/strimzi-crds)."""
    for obj in render(overlay):
        if obj["apiVersion"].startswith("kafka.strimzi.io/"):
            assert not crd_errors(obj), crd_errors(obj)
            # ObjectMeta is not in the CRD schema; the API server checks the name like this.
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", obj["metadata"]["name"])


def test_strimzi_validation_rejects_typos_and_bad_values():
    topic = copy.deepcopy(of_kind(render("prod"), "KafkaTopic")[0])
    topic["spec"]["partitons"] = 3
    assert any("partitons" in e for e in crd_errors(topic))
    pool = copy.deepcopy(of_kind(render("prod"), "KafkaNodePool")[0])
    pool["spec"]["roles"] = ["zookeeper"]
    assert crd_errors(pool)
    user = copy.deepcopy(of_kind(render("prod"), "KafkaUser")[0])
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Publish"]
    assert crd_errors(user)


# ---------------------------------------------------------------------------- the service


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_ports_and_rollout(overlay):
    objs = render(overlay)
    statefulset, c = service(objs)
    s = settings_from(env_of(objs, c))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": s.port, "admin": s.admin_port}
    assert c["args"] == ["serve"]
    probes = {k: (c[k]["httpGet"]["path"], c[k]["httpGet"]["port"]) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/readyz", "http"), "livenessProbe": ("/livez", "http"), "readinessProbe": ("/readyz", "http")}
    # the startup budget is what a slow model load gets before liveness can restart it
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    # A StatefulSet rolls one replica at a time and cannot surge (replica i's spool is its own).
    assert statefulset["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    # the autoscaler's new replicas load their model at the same time, not one after another
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert "replicas" not in statefulset["spec"], "the HorizontalPodAutoscaler owns the replica count"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget_cover_the_service(overlay):
    objs = render(overlay)
    statefulset, _ = service(objs)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "rlhf-service"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels)
    if overlay.startswith("prod"):
        assert hpa["spec"]["minReplicas"] >= 2, "prod keeps a second replica through a node drain (and a rollout)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_public_service_exposes_only_the_api_port(overlay):
    objs = render(overlay)
    statefulset, c = service(objs)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
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
    refs.pop("RLHF_KAFKA_SASL_PASSWORD", None)  # Strimzi's Secret for the KafkaUser: test_kafka_auth.py
    assert {k: r["key"] for k, r in refs.items()} == SECRET_KEYS
    secrets = of_kind(objs, "Secret")
    if overlay.startswith("prod"):
        assert not secrets, "prod commits no Secret: rlhf-secrets is created in the cluster (docs/deploy.md)"
        assert {r["name"] for r in refs.values()} == {"rlhf-secrets"}
    else:
        secret = by_generated_name(objs, "Secret", "rlhf-secrets")
        assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
        assert set(SECRET_KEYS.values()) <= set(secret["data"])


# ---------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_trainer_consumes(overlay):
    """One trainer group reads rlhf-trainer's partitions and writes versions: the Deployment or a TrainJob."""
    running_trainers = trainers(render(overlay))
    assert len(running_trainers) == 1, [w["kind"] for w, _ in running_trainers]
    (w, _), = running_trainers
    assert w["kind"] == ("TrainJob" if overlay == "prod-multinode" else "Deployment")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_a_single_recreated_pod(overlay):
    objs = render(overlay)
    deployment, c = trainer(objs)
    # prod-multinode keeps it at 0 (the TrainJob trains; applying that overlay stops this pod)
    assert deployment["spec"]["replicas"] == (0 if overlay == "prod-multinode" else 1)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    port = settings_from(env_of(objs, c)).trainer_metrics_port
    assert port and c["ports"] == [{"name": "metrics", "containerPort": port}], "its one port: Prometheus metrics"


def nproc(args: list[str]) -> int:
    """The `--nproc N` of `rlhf train ...` (1 without it)."""
    assert args[0] == "train", args
    return int(args[args.index("--nproc") + 1]) if "--nproc" in args else 1


def gpus(container: dict) -> int:
    """The container's nvidia.com/gpu, which must be the same in requests and limits (extended resources)."""
    requests = container["resources"].get("requests", {}).get("nvidia.com/gpu")
    limits = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert requests == limits, f"nvidia.com/gpu: requests {requests} != limits {limits}"
    return int(limits or 0)


def ranks_per_pod(w: dict, c: dict) -> int:
    """Processes in one pod of `w`: torchrun's ranks for a trainer, 1 for the service."""
    if w["kind"] == "TrainJob":
        return w["spec"]["trainer"]["numProcPerNode"]
    return nproc(c["args"]) if c["args"][0] == "train" else 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_runs_a_rank_per_gpu(overlay):
    """`rlhf train --nproc N` execs torchrun with N ranks: N is the pod's GPU count (1 rank on a CPU trainer)."""
    _, c = trainer(render(overlay))
    assert c["args"][:1] == ["train"]
    assert nproc(c["args"]) == (gpus(c) or 1), f"{overlay}: --nproc {nproc(c['args'])} with {gpus(c)} GPU(s)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_service_and_the_trainer(overlay):
    """The kubernetes_sd annotation convention: scrape, port, path, on the pod template."""
    objs = render(overlay)
    for (deployment, c), port in ((service(objs), "http"), (trainer(objs), "metrics"), *((t, "metrics") for t in trainers(objs))):
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(named[port]),
                               "prometheus.io/path": "/metrics"}, deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("prod")])
def test_prod_trainer_gets_a_gpu(overlay):
    objs = render(overlay)
    ((deployment, c),) = trainers(objs)
    assert gpus(c) >= 1
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
    assert set(claims) == {"rlhf-service", "rlhf-trainer"}  # the Deployment and, where there is one, the TrainJob
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
        name = mounts[str(s.state_dir)]["name"]
        if w["kind"] == "StatefulSet":  # the service: its own claim per replica (test_spool.py)
            assert name not in volumes and name in {t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]}
            continue
        claim = get(objs, "PersistentVolumeClaim", volumes[name]["persistentVolumeClaim"]["claimName"])
        # one pod: its own block volume; a TrainJob: every pod mounts it, rank 0 (wherever pod 0 lands) writes it
        assert claim["spec"]["accessModes"] == (["ReadWriteMany"] if w["kind"] == "TrainJob" else ["ReadWriteOnce"])


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
        ranks = ranks_per_pod(w, c)
        assert threads == str(max(1, int(c["resources"]["requests"]["cpu"]) // ranks)), \
            "torch sizes its pool by the node, not the pod: each of the pod's processes gets its share of the CPU request"
    # ... and no Service name would produce one even where links are on (the JobSet of a
    # TrainJob makes a headless Service named like the TrainJob)
    for name in [svc["metadata"]["name"] for svc in of_kind(objs, "Service")] + [t["metadata"]["name"] for t in of_kind(objs, "TrainJob")]:
        prefix = name.upper().replace("-", "_")
        link_vars = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
        assert not link_vars & settings_env, f"Service {name} shadows a setting: {link_vars & settings_env}"
    sa = get(objs, "ServiceAccount", "rlhf")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay):
    for w in workloads(render(overlay)):
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
def test_network_policy_opens_only_the_trainers_metrics_port_to_prometheus_and_the_service(overlay):
    """... (the loop page's GET /loop) and, for a TrainJob, every port between its own pods (rendezvous, NCCL), to
    nothing else."""
    objs = render(overlay)
    ((w, c),) = trainers(objs)
    labels = w["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert policies and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    rules = [r for p in policies for r in p["spec"]["ingress"]]
    prometheus = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    port = settings_from(env_of(objs, c)).trainer_metrics_port
    expected = [{"from": [prometheus], "ports": [{"port": port, "protocol": "TCP"}]},
                {"from": [{"podSelector": {"matchLabels": SERVICE_LABELS}}], "ports": [{"port": port, "protocol": "TCP"}]}]
    assert selects({"matchLabels": SERVICE_LABELS}, service(objs)[0]["spec"]["template"]["metadata"]["labels"])
    if w["kind"] == "TrainJob":
        expected.append({"from": [{"podSelector": {"matchLabels": TRAINER_LABELS}}]})
        assert selects({"matchLabels": TRAINER_LABELS}, labels)
    assert sorted(rules, key=json.dumps) == sorted(expected, key=json.dumps)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_loop_page_reaches_the_trainers_rank_0_and_only_it(overlay):
    """The service's RLHF_TRAINER_URL names a Service on the trainer's metrics port, the port only rank 0 serves
    (trainer/cli.py), and that Service selects the one pod where rank 0 runs: the Deployment's, or pod 0 of a
    TrainJob (the Job controller labels each pod of an indexed Job with its completion index), no other."""
    objs = render(overlay)
    url = urlsplit(settings_from(env_of(objs, service(objs)[1])).trainer_url)
    ((w, c),) = trainers(objs)
    svc = get(objs, "Service", url.hostname)
    assert svc["metadata"].get("namespace") == w["metadata"].get("namespace"), "a bare name resolves in its own namespace"
    (port,) = svc["spec"]["ports"]
    metrics = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert url.scheme == "http" and url.port == port["port"] and port["targetPort"] == "metrics"
    assert metrics == settings_from(env_of(objs, c)).trainer_metrics_port
    labels = w["spec"]["template"]["metadata"]["labels"]
    if w["kind"] == "TrainJob":
        assert w["spec"]["replicas"] >= 2
        pods = [{**labels, "batch.kubernetes.io/job-completion-index": str(i)} for i in range(w["spec"]["replicas"])]
    else:
        assert w["spec"]["replicas"] == 1
        pods = [labels]
    selector = {"matchLabels": svc["spec"]["selector"]}
    assert [selects(selector, pod) for pod in pods] == [True] + [False] * (len(pods) - 1)
    others = [o for o, _ in rlhf_containers(objs) if o is not w]
    assert others and not any(selects(selector, o["spec"]["template"]["metadata"]["labels"]) for o in others)


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
    """Every Kafka client bootstraps from the one listener, which only they reach (SASL/TLS: test_kafka_auth.py)."""
    objs = render("prod")
    (kafka,) = of_kind(objs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["type"] == "internal"
    for _, c in rlhf_containers(objs):
        s = settings_from(env_of(objs, c))
        assert s.kafka_bootstrap_servers == f"{kafka['metadata']['name']}-kafka-bootstrap:{listener['port']}"
        assert s.create_topics is False, "the KafkaTopic objects own the topics"
    # Strimzi makes a NetworkPolicy of this for the listener's port: our pods, nothing else
    assert listener["networkPolicyPeers"] == [{"podSelector": {"matchLabels": KAFKA_CLIENT}}]


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
