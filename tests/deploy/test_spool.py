"""The service's event spool survives the deletion of its pod (issue 13, "durability in Kubernetes").

    .venv/bin/python -m pytest -q tests/deploy/test_spool.py

The design (docs/deploy.md, "The event spool"): the service is a StatefulSet, so replica i
is always the pod rlhf-service-<i>, its hostname is that name, and its volume is the claim
state-rlhf-service-<i> from the volumeClaimTemplate, mounted at RLHF_STATE_DIR. The spool
(service/events.py) keys its directory by hostname, <state_dir>/spool/<hostname>-<k>, and a
process that starts adopts what a dead one of the same hostname left. So a pod that is
deleted, evicted, rescheduled or updated comes back as the same name on the same volume
and drains its predecessor's events. Checked here: the manifests give exactly that, and
Spool.claim on such a volume adopts the events (a new random hostname, as a Deployment's
replacement pod has, would not). Not checked without a cluster: the storage class binding
and re-attaching the volume.
"""

from __future__ import annotations

import socket

import pytest
from deploy_support import OVERLAYS, container_env, get, image_env, of_kind, pod_spec, render

from rlhf_loop.core.contracts import Settings
from rlhf_loop.service.events import Record, Spool

UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def service(objs):
    sts = get(objs, "StatefulSet", "rlhf-service")
    (c,) = pod_spec(sts)["containers"]
    env = container_env(objs, c, image_env())
    settings = Settings(**{k[len("RLHF_"):].lower(): v for k, v in env.items() if k.startswith("RLHF_") and not v.startswith("secret:")})
    return sts, c, settings


def quantity(q: str) -> int:
    return int(q[:-2]) * UNITS[q[-2:]] if q[-2:] in UNITS else int(q)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_replica_has_its_own_volume_at_the_spool(overlay):
    sts, c, s = service(render(overlay))
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(s.state_dir)]
    assert s.spool_dir.is_relative_to(s.state_dir)
    assert mount["name"] not in {v["name"] for v in pod_spec(sts)["volumes"]}, "not a pod volume (an emptyDir dies with the pod)"
    (claim,) = [t for t in sts["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == mount["name"]]
    # block storage for one writer: the spool fsyncs on every request
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > s.spool_max_bytes, \
        "the spool's cap fits on the volume: above it events are dropped and counted, the disk never fills"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_replica_keeps_its_hostname_and_its_volume(overlay):
    objs = render(overlay)
    sts, _, _ = service(objs)
    spec = pod_spec(sts)
    # a StatefulSet pod's hostname is its name, rlhf-service-<i>, unless the template overrides it
    assert not {"hostname", "subdomain", "setHostnameAsFQDN", "hostNetwork"} & set(spec)
    # its governing Service is headless and selects the replicas (rlhf-service-<i>.rlhf-admin-api)
    governing = get(objs, "Service", sts["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    assert governing["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    # volumes stay when a pod is deleted (always) and when the autoscaler removes a replica
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rest_of_the_service_is_unchanged(overlay):
    """Same pods to the Services, NetworkPolicies, disruption budget and autoscaler as the Deployment had."""
    objs = render(overlay)
    sts, c, _ = service(objs)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("rlhf-chat", "rlhf-admin-api"):
        assert get(objs, "Service", name)["spec"]["selector"].items() <= labels.items(), name
    (policy,) = [p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "rlhf-service"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == sts["metadata"]["name"]
    assert {p["name"] for p in c["ports"]} == {"http", "admin"}
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(c)


def records(n: int) -> list[Record]:
    return [Record("rlhf.interactions", f"chatcmpl-{i}", b'{"kind": "interaction"}') for i in range(n)]


def test_a_replacement_pod_drains_what_its_predecessor_spooled(tmp_path, monkeypatch):
    """Pod rlhf-service-0 spools during a Kafka outage and is deleted; its replacement adopts the events."""
    s = Settings(state_dir=tmp_path / "state-rlhf-service-0")  # the claim, as the StatefulSet mounts it
    monkeypatch.setattr(socket, "gethostname", lambda: "rlhf-service-0")
    first = Spool.claim(s.spool_dir, s.spool_max_bytes)
    assert first.append(records(3)) and first.depth == 3
    first.close()  # the pod is gone: its flock with it, its files stay on the volume

    again = Spool.claim(s.spool_dir, s.spool_max_bytes)  # same hostname, same volume
    assert again.root == first.root and again.depth == 3
    batch, _ = again.read(10)
    assert [r.key for r in batch] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"], "in order, nothing lost"
    again.close()

    # What a Deployment's replacement would do: a new random hostname claims a new, empty
    # directory, and the three events wait where nobody looks (on an emptyDir they die).
    monkeypatch.setattr(socket, "gethostname", lambda: "rlhf-service-6d4cf56db6-x7k2p")
    other = Spool.claim(s.spool_dir, s.spool_max_bytes)
    assert other.root != first.root and other.depth == 0
    other.close()
