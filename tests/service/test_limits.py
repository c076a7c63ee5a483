"""Voters are who they say: who a vote is from and the token buckets of the vote caps (a fake clock behind
the limiter's one `clock` seam), then real `bentoml serve` processes where one key, or one keyless address,
voting as many invented users meets its cap, only the identity that cast a vote replaces or withdraws it,
and nothing refused reaches Kafka."""

from __future__ import annotations

import httpx
import pytest
from service_helpers import API_KEY, chat, read_events

from rlhf_loop.core.contracts import Feedback, Settings
from rlhf_loop.service.limits import Caller, VoteLimits, identity_of

SECRET = b"server secret"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def limits(clock, **kw) -> VoteLimits:
    return VoteLimits(Settings(**{"vote_rate_limit": 3, "vote_rate_window_s": 60, **kw}), clock=clock)


def test_a_burst_of_the_limit_then_one_vote_per_window_share():
    clock = Clock()
    caps = limits(clock, api_keys="k")
    alice = caps.caller(SECRET, "k", "10.0.0.1", "alice")
    assert [caps.admit(alice) for _ in range(3)] == [None] * 3
    refusal = caps.admit(alice)
    assert (refusal.kind, refusal.limit, refusal.retry_after_s) == ("voter", 3, 20)  # one token per 60/3 s
    clock.t += 19.5
    assert caps.admit(alice).retry_after_s == 1  # rounded up: never "retry after 0"
    clock.t += 0.5
    assert caps.admit(alice) is None and caps.admit(alice) is not None


def test_under_a_key_the_user_is_the_voter_without_keys_the_address_is():
    caps = limits(Clock(), api_keys="k=40,j")
    key = identity_of(SECRET, "k", "10.0.0.1")
    assert caps.caller(SECRET, "k", "10.0.0.1", "alice") == Caller(key, f"{key}/alice", 40)
    assert caps.caller(SECRET, "k", "10.0.0.9", None) == Caller(key, key, 40)  # the address does not matter
    assert caps.caller(SECRET, "j", "10.0.0.1", "alice").quota == Settings().vote_key_rate_limit
    address = identity_of(SECRET, None, "10.0.0.1")
    assert caps.caller(SECRET, None, "10.0.0.1", "alice") == Caller(address, address, 3)  # `user` is not trusted
    assert caps.caller(SECRET, None, "10.0.0.1", "bob") == caps.caller(SECRET, None, "10.0.0.1", None)
    assert key.startswith("key:") and address.startswith("address:") and key != identity_of(SECRET, "j", "10.0.0.1")
    # hashed with the server's secret: neither the key nor the address is kept, or guessable by hashing
    assert "k" not in key.partition(":")[2] and "10.0.0.1" not in address
    assert identity_of(b"other secret", None, "10.0.0.1") != address


def test_one_key_voting_as_a_thousand_invented_users_gets_its_quota_and_no_more():
    clock = Clock()
    caps = limits(clock, api_keys="k=50,other")
    accepted = sum(caps.admit(caps.caller(SECRET, "k", "a", f"invented{i}")) is None for i in range(1000))
    assert accepted == 50
    refusal = caps.admit(caps.caller(SECRET, "k", "a", "one-more"))
    assert (refusal.kind, refusal.limit) == ("key", 50)
    assert caps.admit(caps.caller(SECRET, "other", "a", "invented0")) is None  # another key: its own quota


def test_the_default_quota_bounds_a_key_without_one():
    caps = limits(Clock(), api_keys="k", vote_key_rate_limit=20)
    assert sum(caps.admit(caps.caller(SECRET, "k", "a", f"u{i}")) is None for i in range(1000)) == 20


def test_without_keys_one_address_naming_a_thousand_users_is_one_voter():
    caps = limits(Clock())
    accepted = [caps.admit(caps.caller(SECRET, None, "10.0.0.1", f"invented{i}")) is None for i in range(1000)]
    assert sum(accepted) == 3 and accepted[:3] == [True] * 3
    assert caps.admit(caps.caller(SECRET, None, "10.0.0.2", "invented0")) is None  # another address


def test_the_quota_counts_withdrawals_and_a_refusal_counts_nothing():
    clock = Clock()
    caps = limits(clock, api_keys="k=4")
    assert all(caps.admit(caps.caller(SECRET, "k", "a", f"u{i}")) is None for i in range(3))
    assert caps.admit(caps.caller(SECRET, "k", "a", None), withdrawal=True) is None  # the 4th, a withdrawal
    u9 = caps.caller(SECRET, "k", "a", "u9")
    assert caps.admit(u9).kind == "key"
    clock.t += 15  # one token back in the key's bucket (60/4 s)
    assert caps.admit(u9) is None  # u9's refused vote took nothing from u9


def test_withdrawals_are_not_counted_per_voter():
    caps = limits(Clock(), api_keys="k")
    for _ in range(10):
        assert caps.admit(caps.caller(SECRET, "k", "a", None), withdrawal=True) is None


def test_without_keys_votes_and_withdrawals_share_the_address_cap():
    caps = limits(Clock())
    me = caps.caller(SECRET, None, "10.0.0.1", None)
    assert caps.admit(me, withdrawal=True) is None and caps.admit(me) is None and caps.admit(me) is None
    assert caps.admit(me, withdrawal=True).kind == "address"


def test_memory_is_bounded_least_recently_used_first():
    caps = limits(Clock(), api_keys="k")
    caps.voters.max_buckets = 2
    for user in ("a", "b", "a", "c"):
        caps.admit(caps.caller(SECRET, "k", "x", user))
    assert [name.rpartition("/")[2] for name in caps.voters._buckets] == ["a", "c"]


# ---------------------------------------------------------------------------- against a real service

OTHER_KEY = "sk-other-key"
THIRD_KEY = "sk-third-key"


@pytest.fixture(scope="module")
def keyed(start_service, module_broker):
    """Three keys, API_KEY with a quota of 8; 3 votes per voter. A window of an hour: no token comes back
    while the tests run, whatever the machine's speed."""
    return start_service(module_broker.bootstrap, api_keys=f"{API_KEY}=8,{OTHER_KEY},{THIRD_KEY}",
                         vote_rate_limit="3", vote_rate_window_s="3600")


def accepted_events(bootstrap: str, rid: str, accepted: list[str]) -> list[Feedback]:
    """The Feedback events on Kafka for response `rid`, once every id in `accepted` is there (resends once)."""
    events = read_events(bootstrap, ["rlhf.feedback"], until=lambda evs: {e.feedback_id for e in evs} >= set(accepted))
    return list({e.event_id: e for e in events if isinstance(e, Feedback) and e.response_id == rid}.values())


@pytest.mark.timeout(300)
def test_a_key_minting_users_meets_its_quota_a_flooding_user_the_voter_cap_and_nothing_refused_reaches_kafka(
        keyed, module_broker):
    svc = keyed
    rid = chat(svc.openai(), max_tokens=4).id
    accepted: list[str] = []

    def vote(user: str | None, key: str = API_KEY) -> int:
        with svc.http(headers={"Authorization": f"Bearer {key}"}) as http:
            r = http.post("/v1/feedback", json={"response_id": rid, "rating": "up", "user": user})
        if r.status_code == 202:
            accepted.append(r.json()["id"])
        return r.status_code

    flood = [vote("flooder") for _ in range(5)]
    assert flood == [202, 202, 202, 429, 429]
    with svc.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        refused = http.post("/v1/feedback", json={"response_id": rid, "rating": "up", "user": "flooder"})
    # a token per 3600/3 s, less what came back since the first vote (seconds, on a slow machine)
    assert 1100 <= int(refused.headers["Retry-After"]) <= 1200
    assert refused.json()["error"]["code"] == refused.json()["error"]["type"] == "rate_limit_exceeded"
    invented = [vote(f"invented{i}") for i in range(30)]  # the key's quota is 8 votes: 3 are spent
    assert invented == [202] * 5 + [429] * 25
    assert vote("flooder", key=OTHER_KEY) == 202  # another key: its own users and quota

    assert svc.metric("rlhf_votes_rate_limited_total", identity_kind="voter") == 3
    assert svc.metric("rlhf_votes_rate_limited_total", identity_kind="key") == 25
    svc.wait_drained()
    ours = accepted_events(module_broker.bootstrap, rid, accepted)
    assert sorted(e.feedback_id for e in ours) == sorted(accepted) and len(accepted) == 9
    (identity,) = {e.identity for e in ours if e.user.startswith("invented")}
    key_votes = [e for e in ours if e.identity == identity]
    assert len(key_votes) == 8 and identity.startswith("key:")
    assert all(e.voter == f"{identity}/{e.user}" for e in key_votes)
    assert len({e.identity for e in ours}) == 2  # two keys, two identities
    assert not any(API_KEY in e.model_dump_json() or OTHER_KEY in e.model_dump_json() for e in ours)


@pytest.mark.timeout(300)
def test_only_the_key_that_cast_a_vote_replaces_or_withdraws_it(keyed, module_broker):
    rid = chat(keyed.openai(), max_tokens=4).id
    mine = keyed.http(headers={"Authorization": f"Bearer {OTHER_KEY}"})
    theirs = keyed.http(headers={"Authorization": f"Bearer {THIRD_KEY}"})

    def vote(client: httpx.Client, rating: str, **body) -> str:
        r = client.post("/v1/feedback", json={"response_id": rid, "rating": rating, **body})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    with mine, theirs:
        alice, keyed_vote = vote(mine, "up", user="alice"), vote(mine, "up", feedback_id="client-key")
        # the other key naming the same user, or the same client key: second votes, never replacements
        their_alice, their_keyed = vote(theirs, "down", user="alice"), vote(theirs, "down", feedback_id="client-key")
        assert len({alice, keyed_vote, their_alice, their_keyed}) == 4
        spooled = keyed.metric("rlhf_events_spooled_total")
        for fid in (alice, keyed_vote):
            refused = theirs.delete(f"/v1/feedback/{fid}")
            assert refused.status_code == 403, refused.text
            assert (refused.json()["error"]["code"], refused.json()["error"]["type"]) == \
                ("permission_denied", "invalid_request_error")
        assert keyed.metric("rlhf_events_spooled_total") == spooled  # nothing written
        assert vote(mine, "down", user="alice") == alice  # the key that cast it replaces it ...
        assert mine.delete(f"/v1/feedback/{alice}").status_code == 202  # ... and withdraws it

    keyed.wait_drained()
    ours = accepted_events(module_broker.bootstrap, rid, [alice, keyed_vote, their_alice, their_keyed])
    by_id = {fid: [(e.rating, e.deleted) for e in ours if e.feedback_id == fid]
             for fid in (alice, keyed_vote, their_alice, their_keyed)}
    assert by_id == {alice: [(1, False), (-1, False), (None, True)], keyed_vote: [(1, False)],
                     their_alice: [(-1, False)], their_keyed: [(-1, False)]}
    assert len(ours) == 6


def from_address(svc, address: str) -> httpx.Client:
    """A client whose requests come from `address` (a loopback address other than 127.0.0.1 is another client)."""
    return svc.http(transport=httpx.HTTPTransport(local_address=address))


@pytest.mark.timeout(300)
def test_without_keys_an_address_naming_many_users_is_one_voter_and_only_it_replaces_or_withdraws_its_votes(
        start_service, module_broker):
    svc = start_service(module_broker.bootstrap, api_keys="", vote_rate_limit="4", vote_rate_window_s="3600")
    rid = chat(svc.openai(api_key="none"), max_tokens=4).id
    with from_address(svc, "127.0.0.1") as me, from_address(svc, "127.0.0.2") as other:
        def vote(client: httpx.Client, rating: str, user: str | None = None) -> httpx.Response:
            return client.post("/v1/feedback", json={"response_id": rid, "rating": rating, "user": user,
                                                     "feedback_id": "k0"})

        first = vote(me, "up", "invented0").json()["id"]
        theirs = vote(other, "down")  # the same client key from another address: a second vote, not a replacement
        assert theirs.status_code == 202 and theirs.json()["id"] != first
        spooled = svc.metric("rlhf_events_spooled_total")
        refused = other.delete(f"/v1/feedback/{first}")
        assert refused.status_code == 403, refused.text
        assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == ("permission_denied", "feedback_id")
        assert svc.metric("rlhf_events_spooled_total") == spooled  # nothing written
        assert vote(me, "down", "invented1").json()["id"] == first  # the same address replaces its vote ...
        assert me.delete(f"/v1/feedback/{first}").status_code == 202  # ... and withdraws it
        # the address's cap is 4 votes and withdrawals, 3 spent: naming new users buys nothing
        flood = [me.post("/v1/feedback", json={"response_id": rid, "rating": "up", "user": f"invented{i}"})
                 for i in range(2, 12)]
        assert [r.status_code for r in flood] == [202] + [429] * 9
        assert flood[1].json()["error"]["code"] == "rate_limit_exceeded"

    svc.wait_drained()
    ids = [first, theirs.json()["id"], flood[0].json()["id"]]
    ours = accepted_events(module_broker.bootstrap, rid, ids)
    assert len(ours) == 5  # up, replaced by down, withdrawn, one flood vote; the other address's: nothing refused
    assert [(e.rating, e.deleted) for e in ours if e.feedback_id == first] == [(1, False), (-1, False), (None, True)]
    mine = [e for e in ours if e.feedback_id != theirs.json()["id"]]
    (identity,) = {e.identity for e in mine}
    assert identity.startswith("address:") and "127.0.0.1" not in identity
    assert all(e.voter == identity for e in mine if not e.deleted)  # `user` kept as data, not trusted
    assert sorted(e.user for e in mine if not e.deleted) == ["invented0", "invented1", "invented2"]
