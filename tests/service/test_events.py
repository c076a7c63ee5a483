"""The event spool (in-process) and its drainer against a real broker that comes and goes."""

from __future__ import annotations

import json

import pytest
from service_helpers import read_events, wait_until

from rlhf_loop.core.broker import EmbeddedBroker, free_port
from rlhf_loop.core.contracts import Feedback, Settings
from rlhf_loop.service import events as events_mod
from rlhf_loop.service.events import EventLog, Record, Spool


def rec(i: int, key: str = "k") -> Record:
    return Record("t", key, f'{{"i": {i}}}'.encode())


def drain(spool: Spool, batch: int = 1000) -> list[int]:
    out, pos = spool.read(batch)
    spool.commit(pos, len(out))
    return [json.loads(r.value)["i"] for r in out]


def test_records_come_back_in_order_and_once_acknowledged_never_again(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.append([rec(0), rec(1)]) and spool.append([rec(2)])
    assert spool.depth == 3
    first, pos = spool.read(2)
    assert [r.value for r in first] == [rec(0).value, rec(1).value]
    assert spool.read(10)[0][:2] == first  # not acknowledged yet: read again from the same place
    spool.commit(pos, 2)
    assert drain(spool) == [2] and spool.depth == 0
    spool.close()


def test_a_restart_resumes_at_the_cursor(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([rec(i) for i in range(5)])
    _, pos = spool.read(2)
    spool.commit(pos, 2)
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.depth == 3 and drain(again) == [2, 3, 4]


def test_a_torn_record_from_a_crash_mid_append_is_cut_off(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([rec(i) for i in range(3)])
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    whole = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03\x04{\"topic\": \"t\", \"ke")  # header promises 64 bytes, 14 came
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert seg.stat().st_size == whole
    assert again.append([rec(3)])
    assert drain(again) == [0, 1, 2, 3]


def test_segments_roll_and_are_deleted_once_acknowledged(tmp_path, monkeypatch):
    monkeypatch.setattr(events_mod, "SEGMENT_BYTES", 100)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    for i in range(20):
        spool.append([rec(i)])
    assert len(list(tmp_path.glob("*.seg"))) > 3
    assert drain(spool, batch=7) == list(range(7))
    assert drain(spool) == list(range(7, 20))
    assert len(list(tmp_path.glob("*.seg"))) == 1  # the one being written
    spool.append([rec(20)])
    spool.close()
    assert drain(Spool(tmp_path, max_bytes=1 << 20)) == [20]


def test_over_the_cap_events_are_refused_not_written(tmp_path):
    spool = Spool(tmp_path, max_bytes=200)
    assert spool.append([rec(0)])
    size = sum(p.stat().st_size for p in tmp_path.glob("*.seg"))
    assert not spool.append([rec(i) for i in range(1, 20)])
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) == size
    assert spool.depth == 1 and drain(spool) == [0]


def test_each_process_claims_its_own_spool_directory(tmp_path):
    a = Spool.claim(tmp_path, 1 << 20)
    b = Spool.claim(tmp_path, 1 << 20)
    assert a.root != b.root
    a.append([rec(1)])
    a.close()
    c = Spool.claim(tmp_path, 1 << 20)  # a's directory is free again, with a's leftovers
    assert c.root == a.root and drain(c) == [1]
    b.close()
    c.close()


@pytest.mark.timeout(120)
def test_events_spooled_while_the_broker_is_away_arrive_in_order_when_it_comes(tmp_path):
    port = free_port()
    settings = Settings(state_dir=tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{port}")
    log = EventLog.open(settings)
    rid = "chatcmpl-test"
    sent = [Feedback(feedback_id=f"{rid}:k", response_id=rid, rating=1 if i % 2 else -1) for i in range(30)]
    try:
        for e in sent[:20]:
            assert log.emit([e])  # no broker at all: still accepted at once
        with EmbeddedBroker(port=port, log_path=tmp_path / "broker.log") as broker:
            assert log.emit(sent[20:])
            got = read_events(broker.bootstrap, [settings.topic_feedback],
                              until=lambda evs: {e.event_id for e in evs} >= {e.event_id for e in sent})
    finally:
        log.close()
    first_seen = list(dict.fromkeys(e.event_id for e in got))  # duplicates allowed, order of first arrival
    assert first_seen == [e.event_id for e in sent]


def test_an_idle_spool_makes_the_drainer_sleep_not_spin(tmp_path, monkeypatch):
    """With nothing unacknowledged, wait() must block on the condition (fresh spool, and after a
    segment roll where the cursor sits at the end of the old segment): a spinning drainer holds
    the GIL and slows the whole process down."""
    monkeypatch.setattr(events_mod, "SEGMENT_BYTES", 60)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    waits: list[float] = []
    monkeypatch.setattr(spool._appended, "wait", waits.append)
    spool.wait(0.01)
    spool.append([rec(0)])
    spool.append([rec(1)])  # rolls: the first segment is full
    spool.wait(0.01)  # two unacknowledged: returns at once
    drain(spool)
    spool.wait(0.01)
    assert waits == [0.01, 0.01]


@pytest.mark.timeout(120)
def test_a_record_kafka_refuses_is_quarantined_and_the_records_behind_it_arrive_in_order(tmp_path):
    """A vote over 1 MiB (kafka-python's max_request_size, and Kafka's default max.message.bytes;
    tansu enforces no topic max.message.bytes) can never be delivered: it goes to the quarantine
    file with its reason, and the drainer moves on to the records spooled after it."""
    from prometheus_client import REGISTRY

    with EmbeddedBroker(log_path=tmp_path / "broker.log") as broker:
        settings = Settings(state_dir=tmp_path, kafka_bootstrap_servers=broker.bootstrap)
        rid = "chatcmpl-big"
        sent = [Feedback(feedback_id=f"{rid}:k{i}", response_id=rid, rating=1) for i in range(10)]
        huge = Feedback(feedback_id=f"{rid}:huge", response_id=rid, rating=-1, comment="x" * 1_100_000)
        quarantined = lambda: REGISTRY.get_sample_value(  # noqa: E731
            "rlhf_events_quarantined_total", {"topic": settings.topic_feedback, "reason": "MessageSizeTooLargeError"}) or 0
        before = quarantined()
        log = EventLog.open(settings)
        try:
            assert log.emit(sent[:4] + [huge] + sent[4:7])  # one batch: the refusal must not sink its neighbours
            assert log.emit([huge]) and log.emit(sent[7:])  # and a batch of the bad record alone
            got = read_events(broker.bootstrap, [settings.topic_feedback],
                              until=lambda evs: {e.event_id for e in evs} >= {e.event_id for e in sent})
            wait_until(lambda: log.spool.depth == 0, 30, "the spool to drain")
        finally:
            log.close()
    assert list(dict.fromkeys(e.event_id for e in got)) == [e.event_id for e in sent]
    lines = [json.loads(x) for x in (log.spool.root / events_mod.QUARANTINE).read_text().splitlines()]
    assert [(q["topic"], q["key"], q["reason"]) for q in lines] == [(settings.topic_feedback, rid,
                                                                      "MessageSizeTooLargeError")] * 2
    assert all(Feedback.model_validate_json(q["value"]) == huge for q in lines)  # the record itself, replayable
    assert quarantined() - before == 2
