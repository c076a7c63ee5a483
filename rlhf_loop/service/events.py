"""Events out of the request path: a write-ahead spool on local disk, drained to Kafka in order.

    log = EventLog.open(settings); log.emit([Interaction(...)]); ...; log.close()

`emit` appends the events to the spool and fsyncs: that is all a request waits for, so a
slow or absent Kafka never fails or stalls a chat. One drainer thread reads the spool in
order, sends with kafka-python (acks=all, key = the event's `key`, a response id), waits for
the acks, and only then moves the spool's persisted cursor. On any Kafka error it backs off, reconnects (and
re-creates missing topics: the embedded broker forgets them when it restarts) and resends
from the cursor. Delivery is at-least-once: a crash between an ack and the cursor write,
or a batch that failed half-way, resends events; consumers dedupe by `event_id`.
A record Kafka refuses for good (PERMANENT below: too large, invalid) is moved to the spool
directory's quarantine file, with the reason, and the cursor moves past it, so one bad
record never blocks the ones behind it (docs/service.md says how to replay them).

Spool layout (one directory per replica, claimed with an flock so two processes on one
host never share one, and a restarted process drains what its predecessor left):

    <spool_dir>/<hostname>-<k>/lock
    <spool_dir>/<hostname>-<k>/000000000001.seg   records: u32 length, u32 crc32, JSON {topic, key, value}
    <spool_dir>/<hostname>-<k>/cursor             JSON {segment, offset} of the first unacknowledged record
    <spool_dir>/<hostname>-<k>/quarantine.jsonl   records Kafka refused, a line each:
                                                  JSON {ts, reason, error, topic, key, value}
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kafka import KafkaProducer
from kafka import errors as Errors
from kafka.errors import KafkaError

from rlhf_loop.core.broker import client_options, describe_connection, ensure_topics
from rlhf_loop.core.contracts import Feedback, Interaction, Preference, Settings
from rlhf_loop.service import metrics

log = logging.getLogger(__name__)

# Errors after which Kafka will never take *this record*, however often it is resent: too big
# for the producer's request or the topic's max.message.bytes, invalid to the broker, or
# addressed to a topic name the broker refuses. Such a record is quarantined so that the
# records behind it move on. Everything else is retried from the cursor: the network, a
# broker away, a leader moving, a missing topic (re-created) -- and also a refused login or
# a missing ACL, which are misconfigurations every record would meet: quarantining would
# only empty the spool into the quarantine file instead of waiting for the fix.
PERMANENT = (Errors.MessageSizeTooLargeError, Errors.RecordListTooLargeError, Errors.InvalidRecordError,
             Errors.InvalidTopicError)
REFUSED_LOGIN = (Errors.SaslAuthenticationFailedError, Errors.UnsupportedSaslMechanismError, Errors.AuthorizationError)

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
SEGMENT_BYTES = 4 * 1024 * 1024  # roll to a new segment file after this many bytes
QUARANTINE = "quarantine.jsonl"


@dataclass(frozen=True)
class Record:
    topic: str
    key: str
    value: bytes


class Position(NamedTuple):
    segment: int
    offset: int


class Spool:
    """An append-only, crash-safe queue of records in segment files, with one persisted read cursor."""

    def __init__(self, root: Path, max_bytes: int, lock_file=None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock_file = lock_file  # held open: the flock that makes this directory ours
        self._lock = threading.Lock()  # appends and cursor moves; never held while talking to Kafka
        self._appended = threading.Condition(self._lock)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cursor = self._read_cursor()
        segments = self._segments()
        if not segments:
            segments = [max(1, self._cursor.segment)]
            (self.root / _seg_name(segments[0])).touch()
        self._sizes = {s: self._recover(s) for s in segments}
        self._end = Position(segments[-1], self._sizes[segments[-1]])
        self._file = open(self.root / _seg_name(self._end.segment), "ab")
        self.depth = sum(1 for _ in self._scan(self._cursor, self._end, dict(self._sizes)))
        self._publish_gauges(self.depth, sum(self._sizes.values()))

    @classmethod
    def claim(cls, spool_dir: Path, max_bytes: int) -> "Spool":
        """The first `<hostname>-<k>` directory no live process holds (its flock is ours until exit)."""
        host = socket.gethostname()
        for k in range(1024):
            root = Path(spool_dir) / f"{host}-{k}"
            root.mkdir(parents=True, exist_ok=True)
            lock = open(root / "lock", "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            return cls(root, max_bytes, lock_file=lock)
        raise RuntimeError(f"no free spool directory under {spool_dir}")

    # -- writing (request path)

    def append(self, records: list[Record]) -> bool:
        """Append and fsync; False (nothing written) when the spool is over its size cap."""
        frames = b"".join(_HEADER.pack(len(p), zlib.crc32(p)) + p for p in map(_encode, records))
        with self._lock:
            if sum(self._sizes.values()) + len(frames) > self.max_bytes:
                return False
            if self._end.offset >= SEGMENT_BYTES:
                self._roll()
            self._file.write(frames)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._end = Position(self._end.segment, self._end.offset + len(frames))
            self._sizes[self._end.segment] = self._end.offset
            self.depth += len(records)
            self._appended.notify_all()
            gauges = self.depth, sum(self._sizes.values())
        self._publish_gauges(*gauges)
        return True

    def _roll(self) -> None:
        self._file.close()
        seg = self._end.segment + 1
        self._file = open(self.root / _seg_name(seg), "ab")
        _fsync_dir(self.root)
        self._sizes[seg] = 0
        self._end = Position(seg, 0)

    # -- reading (drainer thread)

    def wait(self, timeout: float) -> None:
        """Block until something is unacknowledged or `timeout` passes."""
        with self._lock:
            if self.depth == 0:  # (not "cursor == end": after a segment roll they differ with nothing to read)
                self._appended.wait(timeout)

    def read(self, max_records: int) -> tuple[list[Record], Position]:
        """Up to `max_records` unacknowledged records in order, and the position after them."""
        with self._lock:
            start, end, sizes = self._cursor, self._end, dict(self._sizes)
        out: list[Record] = []
        pos = start
        for rec, after in self._scan(start, end, sizes):
            out.append(rec)
            pos = after
            if len(out) >= max_records:
                break
        return out, pos

    def commit(self, pos: Position, n_records: int) -> None:
        """Persist the cursor at `pos` (the records before it are acknowledged); drop finished segments."""
        _write_atomic(self.root / "cursor", json.dumps({"segment": pos.segment, "offset": pos.offset}).encode())
        with self._lock:
            self._cursor = pos
            self.depth -= n_records
            done = [s for s in self._sizes if s < pos.segment]
            for s in done:
                del self._sizes[s]
            gauges = self.depth, sum(self._sizes.values())
        for s in done:
            (self.root / _seg_name(s)).unlink(missing_ok=True)
        self._publish_gauges(*gauges)

    def quarantine(self, entry: dict) -> Path:
        """Append one refused record to the quarantine file, durably (before the cursor moves past it)."""
        path = self.root / QUARANTINE
        with open(path, "ab") as f:
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def wake(self) -> None:
        with self._lock:
            self._appended.notify_all()

    def close(self) -> None:
        with self._lock:
            self._file.close()
        if self._lock_file is not None:
            self._lock_file.close()

    # -- internals

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.root.glob("*.seg") if p.stem.isdigit())

    def _read_cursor(self) -> Position:
        try:
            c = json.loads((self.root / "cursor").read_text())
            return Position(int(c["segment"]), int(c["offset"]))
        except FileNotFoundError:
            return Position(0, 0)

    def _recover(self, seg: int) -> int:
        """Length of the segment's valid prefix; a torn tail (crash mid-append) is truncated away."""
        path = self.root / _seg_name(seg)
        data = path.read_bytes()
        pos = 0
        while pos + _HEADER.size <= len(data):
            n, crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size: pos + _HEADER.size + n]
            if len(payload) < n or zlib.crc32(payload) != crc:
                break
            pos += _HEADER.size + n
        if pos < len(data):
            log.warning("spool %s: truncating %d bytes of a torn record", path, len(data) - pos)
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return pos

    def _scan(self, start: Position, end: Position, sizes: dict[int, int]):
        """(record, position after it) from `start` up to `end`, across segments of the given sizes."""
        seg, offset = max(start, Position(min(sizes, default=start.segment), 0))
        while (seg, offset) < end:
            limit = end.offset if seg == end.segment else sizes.get(seg, 0)
            if offset < limit:
                with open(self.root / _seg_name(seg), "rb") as f:
                    f.seek(offset)
                    data = f.read(limit - offset)
                pos = 0
                while pos < len(data):
                    n, _crc = _HEADER.unpack_from(data, pos)
                    payload = data[pos + _HEADER.size: pos + _HEADER.size + n]
                    pos += _HEADER.size + n
                    yield _decode(payload), Position(seg, offset + pos)
            if seg == end.segment:
                return
            seg, offset = seg + 1, 0

    @staticmethod
    def _publish_gauges(depth: int, size: int) -> None:
        metrics.spool_depth.set(depth)
        metrics.spool_bytes.set(size)


class EventLog:
    """Interaction, Feedback and Preference events -> spool (request path) -> Kafka (drainer thread)."""

    BATCH = 500  # records per send/ack round

    def __init__(self, settings: Settings, spool: Spool):
        self.settings = settings
        self.spool = spool
        self._producer: KafkaProducer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="event-drainer", daemon=True)

    @classmethod
    def open(cls, settings: Settings) -> "EventLog":
        client_options(settings)  # a Kafka setting no client can connect with stops the start, with its name
        log_ = cls(settings, Spool.claim(settings.spool_dir, settings.spool_max_bytes))
        log_._thread.start()
        return log_

    def topic_of(self, event: Interaction | Feedback | Preference) -> str:
        """Preferences share the feedback topic (their own `kind`): the trainer's consumer reads both in one
        stream, and no deployment needs a new topic or ACL (docs/architecture.md)."""
        return self.settings.topic_interactions if isinstance(event, Interaction) else self.settings.topic_feedback

    def emit(self, events: list[Interaction | Feedback | Preference]) -> bool:
        """Spool the events (durable on return). False if they were dropped: spool over its cap, or disk error."""
        records = [Record(self.topic_of(e), e.key, e.to_bytes()) for e in events]
        try:
            ok = self.spool.append(records)
            if not ok:
                log.error("spool over its cap of %d bytes: dropped %d events (Kafka unreachable for long?)",
                          self.spool.max_bytes, len(records))
        except OSError:
            log.exception("spool append failed: dropped %d events", len(records))
            ok = False
        for r in records:
            (metrics.events_spooled if ok else metrics.events_dropped).labels(topic=r.topic).inc()
        return ok

    def close(self, timeout: float = 5.0) -> None:
        """Stop after delivering what Kafka takes within `timeout`; the rest stays spooled for the next start."""
        self._stop.set()
        self.spool.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():  # still waiting on Kafka: leave it (a daemon) and the spool as they are
            log.warning("shutting down with %d events still spooled; they are sent on the next start", self.spool.depth)
            return
        if self._producer is not None:
            self._producer.close(timeout=1)
            self._producer = None
        self.spool.close()

    # -- drainer thread

    def _drain(self) -> None:
        backoff = 0.2
        while True:
            batch, end = self.spool.read(self.BATCH)
            if not batch:
                if self._stop.is_set():
                    return
                self.spool.wait(1.0)
                continue
            try:
                refused = self._send(batch)
                if refused and len(batch) > 1:
                    # Kafka fails a whole produce batch for one bad record in it: find out which
                    # records it refuses for themselves, one at a time (a rare, slow path)
                    self._isolate(len(batch))
                else:
                    self._settle(batch, refused, end)
            except (KafkaError, OSError) as e:
                if self._stop.is_set():
                    return
                metrics.kafka_errors.labels(reason=type(e).__name__).inc()
                if isinstance(e, REFUSED_LOGIN):
                    log.error("Kafka at %s refused the service (%s: %s): check RLHF_KAFKA_SASL_* and the user's ACLs; "
                              "%d events wait in the spool, retrying in %.1fs", describe_connection(self.settings),
                              type(e).__name__, e, self.spool.depth, backoff)
                else:
                    log.warning("kafka delivery to %s failed (%s: %s); %d events wait in the spool, retrying in %.1fs",
                                describe_connection(self.settings), type(e).__name__, e, self.spool.depth, backoff)
                self._reset_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2

    def _send(self, batch: list[Record]) -> list[tuple[Record, KafkaError]]:
        """Send the batch and wait for every ack; the records Kafka refused for good, with why.
        Raises on any other failure (the caller retries the batch from the cursor)."""
        producer = self._producer or self._connect()
        outcomes = []
        for r in batch:
            try:
                outcomes.append(producer.send(r.topic, key=r.key.encode(), value=r.value))
            except PERMANENT as e:  # kafka-python refuses a record over max_request_size before sending it
                outcomes.append(e)
        producer.flush(timeout=15)
        refused = []
        for r, f in zip(batch, outcomes):
            error = f if isinstance(f, KafkaError) else f.exception
            if isinstance(error, PERMANENT):
                refused.append((r, error))
            elif error is not None:
                raise error
            elif not f.succeeded():
                raise KafkaError("send not acknowledged within the flush timeout")
        return refused

    def _isolate(self, n: int) -> None:
        """Deliver the next `n` spooled records one at a time, quarantining each one Kafka refuses.
        The records of the failed batch that Kafka had taken are sent again (consumers dedupe)."""
        for _ in range(n):
            one, end = self.spool.read(1)
            self._settle(one, self._send(one), end)

    def _settle(self, batch: list[Record], refused: list[tuple[Record, KafkaError]], end) -> None:
        """Quarantine the refused records, then move the cursor past the whole batch."""
        for r, error in refused:
            path = self.spool.quarantine({"ts": time.time(), "reason": type(error).__name__, "error": str(error),
                                          "topic": r.topic, "key": r.key, "value": r.value.decode()})
            metrics.events_quarantined.labels(topic=r.topic, reason=type(error).__name__).inc()
            log.error("Kafka refused a %d-byte %s record for good (%s: %s); quarantined in %s "
                      "(replay: docs/service.md)", len(r.value), r.topic, type(error).__name__, error, path)
        self.spool.commit(end, len(batch))
        bad = {id(r) for r, _ in refused}
        for r in batch:
            if id(r) not in bad:
                metrics.events_delivered.labels(topic=r.topic).inc()

    def _connect(self) -> KafkaProducer:
        producer = KafkaProducer(
            **client_options(self.settings),
            client_id="rlhf-service",
            acks="all",
            enable_idempotence=True,
            # one request in flight per connection: a retried batch can never overtake the next one,
            # so events of one response reach their partition in spool order
            max_in_flight_requests_per_connection=1,
            linger_ms=5,
            request_timeout_ms=5000,
            max_block_ms=5000,  # metadata waits (a missing topic) fail fast into our backoff
            delivery_timeout_ms=12000,
            retry_backoff_ms=200,
            bootstrap_timeout_ms=5000,  # fail fast into our own backoff while the broker is away ...
            reconnect_backoff_max_ms=1000,  # ... and notice quickly when it is back
        )
        try:
            if self.settings.create_topics:  # after the producer bootstrapped: the broker is up, this is quick
                ensure_topics(self.settings, timeout=5)
        except BaseException:
            producer.close(timeout=0)
            raise
        self._producer = producer
        return producer

    def _reset_producer(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=0)
            self._producer = None


def _encode(r: Record) -> bytes:
    return json.dumps({"topic": r.topic, "key": r.key, "value": r.value.decode()}).encode()


def _decode(payload: bytes) -> Record:
    d = json.loads(payload)
    return Record(d["topic"], d["key"], d["value"].encode())


def _seg_name(seg: int) -> str:
    return f"{seg:012d}.seg"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
