"""A Kafka outage: chat and votes keep working, every event arrives afterwards, in order per response,
and a policy version written meanwhile is picked up by polling LATEST (no announcement can arrive)."""

from __future__ import annotations

import httpx
import pytest
from service_helpers import API_KEY, chat, read_events, wait_until, write_version

from rlhf_loop.core.broker import EmbeddedBroker
from rlhf_loop.core.contracts import Feedback, Interaction

TOPICS = ["rlhf.interactions", "rlhf.feedback"]


def _signature(e) -> tuple:
    if isinstance(e, Interaction):
        return ("interaction", e.choice_index, e.policy_version)
    assert isinstance(e, Feedback)
    return ("feedback", e.feedback_id, e.rating, e.deleted)


class Conversations:
    """Chats and votes through the public API, remembering which events each should produce, in order."""

    def __init__(self, svc):
        self.client = svc.openai()
        self.http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        self.expected: dict[str, list[tuple]] = {}
        self.versions: list[int] = []

    def talk(self, i: int) -> None:
        r = chat(self.client, f"Tell me about rain, please ({i}).", n=2, seed=i, max_tokens=8)
        version = int(r.system_fingerprint.removeprefix("policy-v"))
        self.versions.append(version)
        exp = self.expected[r.id] = [("interaction", c, version) for c in (0, 1)]
        for body in ({"rating": "up", "user": "u1"}, {"rating": "down", "user": "u1"},
                     {"rating": 1, "user": "u2", "choice_index": 1}):
            v = self.http.post("/v1/feedback", json={"response_id": r.id, **body})
            assert v.status_code == 202, v.text
            exp.append(("feedback", v.json()["id"], 1 if body["rating"] in ("up", 1) else -1, False))
        if i % 2:
            fid = exp[-1][1]
            assert self.http.delete(f"/v1/feedback/{fid}").status_code == 202
            exp.append(("feedback", fid, None, True))

    def events_covered(self, events: list) -> bool:
        ids = {e.event_id for e in events}
        return len(ids) >= sum(len(v) for v in self.expected.values())


@pytest.mark.timeout(400)
def test_outage_loses_nothing_and_fails_no_request(start_service, tmp_path_factory):
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log").start()
    try:
        svc = start_service(broker.bootstrap, policy_poll_s="1", vote_rate_limit="0")  # u1 votes until v1 serves
        conv = Conversations(svc)
        for i in range(3):
            conv.talk(i)
        svc.wait_drained()
        before = read_events(broker.bootstrap, TOPICS, until=conv.events_covered)

        broker.stop()  # memory-only: the topics and everything on them are gone with it
        for i in range(3, 6):
            conv.talk(i)
        new = write_version(svc.state_dir / "policies", seed=9)  # no announcement can reach the service now
        wait_until(lambda: conv.talk(len(conv.versions)) or conv.versions[-1] == new, 90,
                   "a chat answered by the version written during the outage")
        assert svc.metric("rlhf_spool_depth") > 0, "events should be waiting in the spool"

        broker = EmbeddedBroker(port=broker.port, log_path=broker.log_path).start()
        svc.wait_drained(120)
        after = read_events(broker.bootstrap, TOPICS,
                            until=lambda evs: conv.events_covered(before + evs))
    finally:
        broker.stop()

    assert 0 in conv.versions and conv.versions[-1] == new
    got: dict[str, list[tuple]] = {}
    seen = set()
    for e in before + after:  # delivery order; a resent duplicate counts once
        if e.event_id not in seen:
            seen.add(e.event_id)
            got.setdefault(e.response_id, []).append(_signature(e))
    assert got == conv.expected
