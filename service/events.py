"""Events out of the request path: a write-ahead spool on local disk, drained to Kafka in order.

    log = EventLog.open(settings); log.emit([Interaction(...)]); ...; log.close()

`emit` appends the events to the spool and fsyncs: that is all a request waits for, so a
slow or absent Kafka never fails or stalls a chat. One drainer thread reads the spool in
order, sends with kafka-python (acks=all, key = response_id), waits for the acks, and only
then moves the spool's persisted cursor. On any Kafka error it backs off, reconnects (and
re-creates missing topics: the embedded broker forgets them when it restarts) and resends
from the cursor. Delivery is at-least-once: a crash between an ack and the cursor write,
or a batch that failed half-way, resends events; consumers dedupe by `event_id`.

Spool layout (one directory per replica, claimed with an flock so two processes on one
host never share one, and a restarted process drains what its predecessor left):

    <spool_dir>/<hostname>-<k>/lock
    <spool_dir>/<hostname>-<k>/000000000001.seg   records: u32 length, u32 crc32, JSON {topic, key, value}
    <spool_dir>/<hostname>-<k>/cursor             JSON {segment, offset} of the first unacknowledged record
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kafka import KafkaProducer
from kafka.errors import KafkaError

from rlhf.broker import ensure_topics
from rlhf.contracts import Feedback, Interaction, Settings
from service import metrics

log = logging.getLogger("rlhf.service.events")

_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
SEGMENT_BYTES = 4 * 1024 * 1024  # roll to a new segment file after this many bytes


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
    """Interaction and Feedback events -> spool (request path) -> Kafka (drainer thread)."""

    BATCH = 500  # records per send/ack round

    def __init__(self, settings: Settings, spool: Spool):
        self.settings = settings
        self.spool = spool
        self._producer: KafkaProducer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="event-drainer", daemon=True)

    @classmethod
    def open(cls, settings: Settings) -> "EventLog":
        log_ = cls(settings, Spool.claim(settings.spool_dir, settings.spool_max_bytes))
        log_._thread.start()
        return log_

    def topic_of(self, event: Interaction | Feedback) -> str:
        return self.settings.topic_interactions if isinstance(event, Interaction) else self.settings.topic_feedback

    def emit(self, events: list[Interaction | Feedback]) -> bool:
        """Spool the events (durable on return). False if they were dropped: spool over its cap, or disk error."""
        records = [Record(self.topic_of(e), e.response_id, e.to_bytes()) for e in events]
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
                self._send(batch)
            except (KafkaError, OSError) as e:
                if self._stop.is_set():
                    return
                metrics.kafka_errors.labels(reason=type(e).__name__).inc()
                log.warning("kafka delivery failed (%s: %s); %d events wait in the spool, retrying in %.1fs",
                            type(e).__name__, e, self.spool.depth, backoff)
                self._reset_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            self.spool.commit(end, len(batch))
            for r in batch:
                metrics.events_delivered.labels(topic=r.topic).inc()

    def _send(self, batch: list[Record]) -> None:
        producer = self._producer or self._connect()
        futures = [producer.send(r.topic, key=r.key.encode(), value=r.value) for r in batch]
        producer.flush(timeout=15)
        for f in futures:
            if f.failed():
                raise f.exception
            if not f.succeeded():
                raise KafkaError("send not acknowledged within the flush timeout")

    def _connect(self) -> KafkaProducer:
        producer = KafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            security_protocol=self.settings.kafka_security_protocol,
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
