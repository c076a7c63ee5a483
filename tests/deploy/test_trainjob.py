"""The multi-node trainer: a Kubeflow Trainer TrainJob on the ClusterTrainingRuntime rlhf-trainer.

    .venv/bin/python -m pytest -q tests/deploy/test_trainjob.py

k8s/components/trainjob, used by k8s/overlays/prod-multinode. What is checked here, without
a cluster: both objects against the openAPIV3Schema of Kubeflow Trainer's CRDs in
../shared/kubeflow-trainer-crds (skipped, saying so, where that directory is absent), and
the CRDs' CEL rules that matter by hand; the pods Kubeflow Trainer will make, as a
Kubernetes Job, against the Kubernetes API; that torchrun, given the PET_* variables
Kubeflow Trainer's torch policy sets, starts `rlhf_loop train` on the right rendezvous; and
that those pods are the single-pod trainer's, with rank 0's state on a claim every node
mounts. Not checked: Kubeflow Trainer's and JobSet's controllers themselves (their
defaulting, webhooks and the JobSet they build), NCCL across real nodes.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path

import deploy_support
import kubernetes_validate
import pytest
from deploy_support import (
    K8S_VERSION,
    OVERLAYS,
    TORCHRUN_ENV,
    TRAINER_ANCESTOR,
    TRAINER_PORT,
    container_env,
    containers,
    crd_errors,
    dockerfile,
    get,
    image_env,
    of_kind,
    pod_spec,
    render,
    runtime_of,
    trainer_job,
    trainjob_pods,
)

from rlhf_loop.core.contracts import Settings

OVERLAY = "prod-multinode"
GROUP = "trainer.kubeflow.org"


@pytest.fixture(scope="module")
def objs():
    return render(OVERLAY)


@pytest.fixture(scope="module")
def trainjob(objs):
    (tj,) = of_kind(objs, "TrainJob")
    return tj


@pytest.fixture(scope="module")
def runtime(objs, trainjob):
    return runtime_of(objs, trainjob)


@pytest.fixture(scope="module")
def pods(objs, trainjob):
    """The TrainJob's pod template as Kubeflow Trainer builds it (deploy_support.trainjob_pods)."""
    return trainjob_pods(objs, trainjob)


def node(pods) -> dict:
    (c,) = containers(pods)
    assert c["name"] == "node", "Kubeflow Trainer injects PET_* only into the container named `node`"
    return c


def settings(objs, pods) -> Settings:
    env = container_env(objs, node(pods), image_env())
    return Settings(**{k[len("RLHF_"):].lower(): v for k, v in env.items() if k.startswith("RLHF_") and not v.startswith("secret:")})


# ---------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubeflow_objects_validate_against_kubeflow_trainer_crds(overlay):
    """Every TrainJob and ClusterTrainingRuntime, strictly (skipped, saying so, without the CRDs)."""
    kubeflow = [o for o in render(overlay) if o["apiVersion"].startswith(f"{GROUP}/")]
    if overlay == OVERLAY:
        assert {o["kind"] for o in kubeflow} == {"TrainJob", "ClusterTrainingRuntime"}
    for obj in kubeflow:
        assert not crd_errors(obj), crd_errors(obj)


def test_without_the_crds_the_test_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(deploy_support.CRD_DIRS, GROUP, tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match=r"trainer.kubeflow.org CRDs not found at .*absent.*not schema-checked"):
        deploy_support.crd_schemas.__wrapped__(GROUP)


def test_kubeflow_validation_rejects_typos_and_bad_values(trainjob, runtime):
    tj = copy.deepcopy(trainjob)
    tj["spec"]["trainer"]["numProcPerNod"] = 8
    assert any("numProcPerNod" in e for e in crd_errors(tj))
    rt = copy.deepcopy(runtime)
    rt["spec"]["template"]["spec"]["failurePolicy"]["restartStrategy"] = "Sometimes"
    assert crd_errors(rt)
    rt = copy.deepcopy(runtime)
    trainer_job(rt)["template"]["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe" in e for e in crd_errors(rt)), "the runtime's pod template is schema-checked too"


def test_the_crds_cel_rules_by_hand(objs, trainjob, runtime):
    """x-kubernetes-validations the schema check above does not evaluate."""
    name = trainjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, "TrainJob names are RFC 1035 labels"
    assert trainjob["spec"]["trainer"]["numProcPerNode"] >= 1
    policy = runtime["spec"]["mlPolicy"]
    assert [k for k in ("torch", "mpi", "jax", "xgboost", "flux") if k in policy] == ["torch"], "one ML policy"
    assert "envInjection" not in policy["torch"], "PET_* go to the container `node` only"
    # Kubeflow Trainer refuses a TrainJob that sets torchrun's variables itself
    assert not {e["name"] for e in trainjob["spec"]["trainer"].get("env", [])} & set(TORCHRUN_ENV)
    # The JobSet is named like the TrainJob and makes a headless Service of that name for the
    # pods' DNS (PET_MASTER_ADDR): no Service of ours may have it.
    assert name not in {s["metadata"]["name"] for s in of_kind(objs, "Service")}


def test_the_pods_validate_as_a_kubernetes_job(objs, trainjob, runtime, pods):
    """The trainer Job Kubeflow Trainer will create (numNodes indexed pods), against the Kubernetes API."""
    job_spec = copy.deepcopy(trainer_job(runtime)["template"]["spec"])
    n = trainjob["spec"]["trainer"]["numNodes"]
    job_spec.update(parallelism=n, completions=n, completionMode="Indexed", template=pods["spec"]["template"])
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{trainjob['metadata']['name']}-node-0",
                                                                 "namespace": trainjob["metadata"]["namespace"]},
           "spec": job_spec}
    try:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"the TrainJob's pods are not a valid Kubernetes {K8S_VERSION} Job: {e}")


# ---------------------------------------------------------------------------- torchrun


def test_kubeflow_trainer_sets_torchruns_rendezvous_and_our_command_reads_it(trainjob, runtime, pods, monkeypatch):
    """The torch policy's PET_* variables, then torchrun's own argument parser on our command.

    Kubeflow Trainer sets, in the container `node` of pod i of the trainer Job: PET_NNODES =
    numNodes, PET_NPROC_PER_NODE = numProcPerNode, PET_NODE_RANK = i (the completion index),
    PET_MASTER_ADDR = <trainjob>-node-0-0.<trainjob> (pod 0), PET_MASTER_PORT = 29500.
    """
    assert trainer_job(runtime)["template"]["metadata"]["labels"].items() >= TRAINER_ANCESTOR.items()
    c = node(pods)
    tini, dashdash, launcher, *args = c["command"] + c["args"]
    assert (tini, dashdash, launcher) == ("tini", "--", "torchrun"), "tini as PID 1, like the image's entrypoint"
    name = trainjob["metadata"]["name"]
    n, per_node = trainjob["spec"]["trainer"]["numNodes"], trainjob["spec"]["trainer"]["numProcPerNode"]
    from torch.distributed import run as torchrun

    for pod in (0, n - 1):
        pet = {"PET_NNODES": str(n), "PET_NPROC_PER_NODE": str(per_node), "PET_NODE_RANK": str(pod),
               "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": str(TRAINER_PORT)}
        assert set(pet) == set(TORCHRUN_ENV)
        for k, v in pet.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as the pod sets it; torchrun would otherwise set 1
        parsed = torchrun.parse_args(args)
        config, cmd, cmd_args = torchrun.config_from_args(parsed)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (n, n, per_node)
        # static rendezvous at pod 0: global rank = node rank * nproc + local rank, so rank 0
        # is local rank 0 of pod 0, the pod whose state volume holds the label store
        assert config.rdzv_backend == "static" and not parsed.standalone
        assert config.rdzv_endpoint == f"{name}-node-0-0.{name}:{TRAINER_PORT}"
        assert config.rdzv_configs["rank"] == pod
        # a dead rank ends the pod, and the JobSet restarts every node (test_a_dead_rank_restarts_every_node)
        assert config.max_restarts == 0
        assert cmd_args == ["-u", "-m", "rlhf_loop", "train"], "the same `rlhf train` as the single-pod trainer"


def test_the_command_exists_in_the_image():
    """torchrun comes with torch into the image's venv (on PATH); tini is the image's own PID 1; rlhf_loop runs as a module."""
    assert shutil.which("torchrun", path=str(Path(sys.executable).parent)), "torch installs the torchrun script"
    assert "/opt/venv/bin" in image_env()["PATH"].split(":")
    (entrypoint,) = [i for i in dockerfile().stage("runtime").instructions if i.cmd == "ENTRYPOINT"]
    assert entrypoint.args.startswith('["tini", "--"')
    from rlhf_loop.app import cli

    assert 'if __name__ == "__main__":' in Path(cli.__file__).read_text()


def test_a_rank_per_gpu_on_every_node(trainjob, pods):
    c = node(pods)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == str(trainjob["spec"]["trainer"]["numProcPerNode"])
    spec = pod_spec(pods)
    assert spec["nodeSelector"] and spec["tolerations"], "on the GPU pool, as the single-pod trainer"
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"] in {
        v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}, "NCCL between a node's ranks"


# ---------------------------------------------------------------------------- state and failures


def test_rank_0_state_and_the_policy_store_are_on_every_node(objs, pods):
    """Pod 0 holds rank 0, but every pod has the same template: both claims are ReadWriteMany."""
    s = settings(objs, pods)
    volumes = {v["name"]: v for v in pod_spec(pods)["volumes"]}
    mounts = {m["mountPath"]: m for m in node(pods)["volumeMounts"]}
    for path in (s.state_dir, s.policy_dir):
        mount = mounts[str(path)]
        assert not mount.get("readOnly")
        claim = get(objs, "PersistentVolumeClaim", volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]
    assert s.trainer_dir.is_relative_to(s.state_dir), "the label store lives on the state claim"
    state = volumes[mounts[str(s.state_dir)]["name"]]["persistentVolumeClaim"]["claimName"]
    single_pod = pod_spec(get(objs, "Deployment", "rlhf-trainer"))["volumes"]
    assert state != {v["name"]: v for v in single_pod}["state"]["persistentVolumeClaim"]["claimName"], \
        "not the single-pod trainer's ReadWriteOnce claim: access modes cannot change, and it cannot follow pod 0"


def test_a_dead_rank_restarts_every_node(runtime, pods):
    """A rank that dies fails its pod, its Job, and the JobSet recreates every pod, old ones gone first."""
    job = trainer_job(runtime)["template"]["spec"]
    assert pod_spec(pods)["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
    # never two rank 0s on the label store: every pod of the old attempt is gone first
    assert policy["restartStrategy"] == "BlockingRecreate"
    assert policy["maxRestarts"] >= 1
    # disruptions (drain, preemption) fail the Job with reason PodFailurePolicy: restart, do not count
    assert job["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    (rule,) = policy["rules"]
    assert rule["action"] == "RestartJobSetAndIgnoreMaxRestarts" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    # torchrun's wait for its ranks on SIGTERM fits in the pod's grace period
    env = {e["name"]: e.get("value") for e in node(pods)["env"]}
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < pod_spec(pods)["terminationGracePeriodSeconds"]


# ---------------------------------------------------------------------------- one trainer, defined once


def test_the_pods_are_the_single_pod_trainers(objs, pods):
    """Copied field by field from the trainer Deployment (k8s/components/trainjob): only the
    container's name, command and resources, the restart policy and the state claim differ."""
    deployment = get(objs, "Deployment", "rlhf-trainer")
    assert deployment["spec"]["replicas"] == 0, "applying prod-multinode stops the single-pod trainer"
    theirs, ours = copy.deepcopy(deployment["spec"]["template"]), copy.deepcopy(pods["spec"]["template"])
    assert ours["metadata"] == theirs["metadata"], "labels (NetworkPolicies, Kafka's peers) and scrape annotations"
    (c_theirs,), (c_ours,) = theirs["spec"].pop("containers"), ours["spec"].pop("containers")
    for key in ("name", "command", "args", "resources"):
        c_theirs.pop(key, None), c_ours.pop(key, None)
    assert c_ours == c_theirs
    assert ours["spec"].pop("restartPolicy") == "Never"
    state = lambda spec: {v["name"]: v for v in spec["volumes"]}["state"]  # noqa: E731
    state(ours["spec"])["persistentVolumeClaim"]["claimName"] = state(theirs["spec"])["persistentVolumeClaim"]["claimName"]
    assert ours["spec"] == theirs["spec"]


def test_the_runtime_refers_to_what_the_overlay_renders(objs, trainjob, runtime, pods):
    """Names in a CRD are invisible to kustomize unless taught (kustomizeconfig.yaml): the hashed ConfigMap."""
    for src in node(pods)["envFrom"]:
        get(objs, "ConfigMap", src["configMapRef"]["name"])
    for v in pod_spec(pods)["volumes"]:
        if "persistentVolumeClaim" in v:
            get(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
    get(objs, "ServiceAccount", pod_spec(pods)["serviceAccountName"])
    # kustomize matches references by namespace; kubectl drops a cluster-scoped object's namespace
    assert runtime["metadata"]["namespace"] == trainjob["metadata"]["namespace"] == get(objs, "Deployment", "rlhf-trainer")["metadata"]["namespace"]


def test_one_rank_talks_to_kafka_all_share_its_settings(objs, pods):
    """Every pod carries the trainer's Kafka identity; only rank 0 (pod 0) connects (trainer/state.py)."""
    env = container_env(objs, node(pods), image_env())
    assert env["RLHF_KAFKA_SASL_PASSWORD"] == "secret:rlhf-trainer/password"
    assert settings(objs, pods).kafka_sasl_username == "rlhf-trainer"
