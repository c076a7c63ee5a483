"""Kafka in prod: SASL SCRAM-SHA-512 over TLS, a Strimzi KafkaUser per client, ACLs on our topics only.

    .venv/bin/python -m pytest -q tests/deploy/test_kafka_auth.py

The Kafka and KafkaUser objects are schema-checked against Strimzi's CRDs in
test_kustomize.py. Here: the listener, the users and their ACLs against what each client
does with which setting's topic, and every client pod's settings, Secret references and CA
mount against them. Not checked without a cluster: the Secrets Strimzi generates (the
user's `password`, the cluster CA's `ca.crt`) exist with those keys, the brokers'
certificates name the bootstrap host, and a client really logs in (the Python side tests
SASL/TLS against a broker).
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from deploy_support import OVERLAYS, container_env, get, image_env, of_kind, pod_spec, render, rlhf_containers

from rlhf_loop.core.contracts import Settings

PROD = [o for o in OVERLAYS if o.startswith("prod")]


def settings_of(objs, container) -> Settings:
    env = container_env(objs, container, image_env())
    return Settings(**{k[len("RLHF_"):].lower(): v for k, v in env.items() if k.startswith("RLHF_") and not v.startswith("secret:")})


def role(workload: dict) -> str:
    """`service` or `trainer` (a TrainJob's pods are the trainer's)."""
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def expected_acls(s: Settings) -> dict[str, dict[tuple[str, str], set[str]]]:
    """What each client does, by the settings' names: the ACLs it needs and no more."""
    return {
        # events out (service/events.py); policy announcements in, without a group (service/versions.py)
        "service": {("topic", s.topic_interactions): {"Describe", "Write"},
                    ("topic", s.topic_feedback): {"Describe", "Write"},
                    ("topic", s.topic_policy_updates): {"Describe", "Read"}},
        # votes in, in its group (trainer/consumer.py); versions and dead letters out
        "trainer": {("topic", s.topic_interactions): {"Describe", "Read"},
                    ("topic", s.topic_feedback): {"Describe", "Read"},
                    ("group", s.trainer_group): {"Read"},
                    ("topic", s.topic_policy_updates): {"Describe", "Write"},
                    ("topic", s.topic_dlq): {"Describe", "Write"}},
    }


@pytest.mark.parametrize("overlay", PROD)
def test_the_listener_authenticates_and_encrypts(overlay):
    (kafka,) = of_kind(render(overlay), "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] is True and listener["authentication"] == {"type": "scram-sha-512"}
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}, "ACLs are enforced"
    assert "userOperator" in kafka["spec"]["entityOperator"], "reconciles the KafkaUsers"


@pytest.mark.parametrize("overlay", PROD)
def test_every_client_logs_in_as_its_own_user(overlay):
    objs = render(overlay)
    (kafka,) = of_kind(objs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    users = {u["metadata"]["name"]: u for u in of_kind(objs, "KafkaUser")}
    by_role = {}
    for w, c in rlhf_containers(objs):
        s = settings_of(objs, c)
        assert s.kafka_security_protocol == "SASL_SSL"
        assert s.kafka_sasl_mechanism == listener["authentication"]["type"].upper()  # scram-sha-512
        user = users[s.kafka_sasl_username]
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        # the password is the one the User Operator generates: Secret <user>, key `password`
        env = container_env(objs, c, image_env())
        assert env["RLHF_KAFKA_SASL_PASSWORD"] == f"secret:{s.kafka_sasl_username}/password"
        by_role.setdefault(role(w), set()).add(s.kafka_sasl_username)
    assert by_role == {"service": {"rlhf-service"}, "trainer": {"rlhf-trainer"}}, "one identity per client"
    assert set(users) == {"rlhf-service", "rlhf-trainer"}, "no user without a client"


@pytest.mark.parametrize("overlay", PROD)
def test_every_client_trusts_the_cluster_ca(overlay):
    objs = render(overlay)
    (kafka,) = of_kind(objs, "Kafka")
    for w, c in rlhf_containers(objs):
        cafile = PurePosixPath(settings_of(objs, c).kafka_ssl_cafile)
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(cafile.parent)]
        assert mount.get("readOnly") and "subPath" not in mount, "no subPath: Strimzi's CA renewals reach the file"
        volume = {v["name"]: v for v in pod_spec(w)["volumes"]}[mount["name"]]
        assert volume["secret"] == {"secretName": f"{kafka['metadata']['name']}-cluster-ca-cert",
                                    "items": [{"key": "ca.crt", "path": cafile.name}]}, w["metadata"]["name"]


@pytest.mark.parametrize("overlay", PROD)
def test_acls_allow_each_client_what_it_does_on_our_topics_only(overlay):
    objs = render(overlay)
    users = {u["metadata"]["name"]: u for u in of_kind(objs, "KafkaUser")}
    for w, c in rlhf_containers(objs):
        s = settings_of(objs, c)
        user = users[s.kafka_sasl_username]
        assert user["spec"]["authorization"]["type"] == "simple"
        acls = {}
        for acl in user["spec"]["authorization"]["acls"]:
            assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*"
            assert acl["resource"].get("patternType", "literal") == "literal", "exact names, no prefixes"
            key = (acl["resource"]["type"], acl["resource"]["name"])
            assert key not in acls, f"{key} twice"
            acls[key] = set(acl["operations"])
        assert acls == expected_acls(s)[role(w)], f"{overlay} {w['metadata']['name']}"


def test_topic_names_in_the_acls_are_the_topics():
    objs = render("prod")
    topics = {t["spec"]["topicName"] for t in of_kind(objs, "KafkaTopic")}
    for user in of_kind(objs, "KafkaUser"):
        named = {a["resource"]["name"] for a in user["spec"]["authorization"]["acls"] if a["resource"]["type"] == "topic"}
        assert named <= topics, f"{user['metadata']['name']}: ACLs on {named - topics}, which no KafkaTopic declares"


def test_dev_stays_plaintext():
    objs = render("dev")
    for w, c in rlhf_containers(objs):
        s = settings_of(objs, c)
        assert s.kafka_security_protocol == "PLAINTEXT" and not s.kafka_sasl_username and not s.kafka_ssl_cafile
        assert "kafka-ca" not in {v["name"] for v in pod_spec(w)["volumes"]}
    assert not of_kind(objs, "KafkaUser")
    broker = get(objs, "StatefulSet", "rlhf-kafka")
    assert broker["spec"]["template"]["spec"]["containers"][0]["ports"] == [{"name": "kafka", "containerPort": 9092}]
