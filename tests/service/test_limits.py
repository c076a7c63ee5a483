"""Vote caps: the token buckets (a fake clock behind the limiter's one `clock` seam), then a real
`bentoml serve` where a flooding user meets the cap and nothing of the refused votes reaches Kafka."""

from __future__ import annotations

import pytest
from service_helpers import API_KEY, chat, read_events

from rlhf_loop.core.contracts import Feedback, Settings
from rlhf_loop.service.limits import Identity, VoteLimits, key_fingerprint, vote_identities


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limits(clock, **kw) -> VoteLimits:
    return VoteLimits(Settings(**{"vote_rate_limit": 3, "vote_rate_window_s": 60, **kw}), clock=clock)


def test_a_burst_of_the_limit_then_one_vote_per_window_share():
    clock = Clock()
    caps = limits(clock)
    alice = vote_identities("k", "alice", "10.0.0.1")
    assert [caps.admit(alice) for _ in range(3)] == [None] * 3
    refusal = caps.admit(alice)
    assert (refusal.kind, refusal.limit, refusal.retry_after_s) == ("user", 3, 20)  # one token per 60/3 s
    clock.t += 19.5
    assert caps.admit(alice).retry_after_s == 1  # rounded up: never "retry after 0"
    clock.t += 0.5
    assert caps.admit(alice) is None and caps.admit(alice) is not None


def test_identities_user_scoped_by_key_else_key_else_address():
    fp = key_fingerprint("k")
    assert vote_identities("k", "alice", "10.0.0.1") == (Identity("user", f"{fp}/alice"), Identity("key_total", fp))
    assert vote_identities("k", None, "10.0.0.1") == (Identity("key", fp), Identity("key_total", fp))
    address = Identity("address_total", "10.0.0.1")
    assert vote_identities(None, "alice", "10.0.0.1") == (Identity("user", "alice"), address)
    assert vote_identities(None, None, "10.0.0.1") == (Identity("address", "10.0.0.1"), address)
    assert "k" not in fp and len(fp) == 16


def test_the_key_cap_bounds_all_its_users_and_withdrawals_and_a_refusal_counts_nothing():
    clock = Clock()
    caps = limits(clock, vote_key_rate_limit=4)
    assert all(caps.admit(vote_identities("k", f"u{i}", "a")) is None for i in range(3))
    assert caps.admit(vote_identities("k", None, "a"), withdrawal=True) is None  # the 4th, a withdrawal
    refusal = caps.admit(vote_identities("k", "u9", "a"))
    assert refusal.kind == "key_total" and refusal.limit == 4
    assert caps.admit(vote_identities("other", "u9", "a")) is None  # another key: its own buckets
    clock.t += 15  # one token back in the key's bucket (60/4 s)
    assert caps.admit(vote_identities("k", "u9", "a")) is None  # u9's refused vote took nothing from u9


def test_withdrawals_are_not_capped_per_identity():
    caps = limits(Clock())
    for _ in range(10):
        assert caps.admit(vote_identities("k", None, "a"), withdrawal=True) is None


def test_memory_is_bounded_least_recently_used_first(monkeypatch):
    caps = limits(Clock())
    caps.own.max_identities = 2
    for user in ("a", "b", "a", "c"):
        caps.admit(vote_identities("k", user, "x"))
    assert [who.name.rpartition("/")[2] for who in caps.own._buckets] == ["a", "c"]


# ---------------------------------------------------------------------------- against a real service

OTHER_KEY = "sk-other-key"


@pytest.mark.timeout(300)
def test_a_flooding_user_gets_429_with_retry_after_and_nothing_of_it_reaches_kafka(start_service, module_broker):
    # a window of an hour: no token comes back while the test runs, whatever the machine's speed
    svc = start_service(module_broker.bootstrap, api_keys=f"{API_KEY},{OTHER_KEY}", vote_rate_limit="3",
                        vote_rate_window_s="3600")
    rid = chat(svc.openai(), max_tokens=4).id
    accepted: list[str] = []

    def vote(user: str | None, key: str = API_KEY, n: int = 1):
        with svc.http(headers={"Authorization": f"Bearer {key}"}) as http:
            out = []
            for i in range(n):
                r = http.post("/v1/feedback", json={"response_id": rid, "rating": "up", "user": user,
                                                    "feedback_id": f"{user or 'anon'}-{key[-3:]}-{i}"})
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                out.append(r)
            return out

    flood = vote("flooder", n=5)
    assert [r.status_code for r in flood] == [202, 202, 202, 429, 429]
    refused = flood[3]
    # a token per 3600/3 s, less what came back since the first vote (seconds, on a slow machine)
    assert 1100 <= int(refused.headers["Retry-After"]) <= 1200
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert [r.status_code for r in vote("calm")] == [202]  # another user is unaffected
    assert [r.status_code for r in vote(None, n=4)] == [202, 202, 202, 429]  # no user: counted against the key
    assert [r.status_code for r in vote(None, key=OTHER_KEY)] == [202]  # ... that key only
    assert [r.status_code for r in vote("flooder", key=OTHER_KEY)] == [202]  # users are scoped by key

    assert svc.metric("rlhf_votes_rate_limited_total", identity_kind="user") == 2
    assert svc.metric("rlhf_votes_rate_limited_total", identity_kind="key") == 1
    svc.wait_drained()
    events = read_events(module_broker.bootstrap, ["rlhf.feedback"],
                         until=lambda evs: {e.feedback_id for e in evs} >= set(accepted))
    ours = {e.event_id: e for e in events if isinstance(e, Feedback) and e.response_id == rid}  # resends count once
    assert sorted(e.feedback_id for e in ours.values()) == sorted(accepted) and len(accepted) == 9
