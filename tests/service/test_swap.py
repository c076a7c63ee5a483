"""Hot swap of policy versions under concurrent traffic, refusal of a corrupted version, and the admin API (pin/unpin)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx
import pytest
from service_helpers import MODEL, announce, read_events, wait_until, write_adapter_version, write_version

from rlhf_loop.core.contracts import Interaction, parse_response_id

ADMIN_KEY = "admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPTS = ([{"role": "user", "content": "What do you think of coffee?"}], [{"role": "user", "content": "Tell me about rain."}])
PROMPT = PROMPTS[0]
# versions far enough apart that a token decoded by the wrong one shows in the answer (the embedded
# model's answers follow from their first words, so a small perturbation would hide a mix-up)
NOISE = 0.5


@pytest.fixture(scope="module")
def swap_service(start_service, module_broker):
    # LATEST polling slowed right down: versions here move by announcement (test_outage covers the poll)
    svc = start_service(module_broker.bootstrap, admin_key=ADMIN_KEY, policy_poll_s="3600")
    wait_until(lambda: svc.metric("rlhf_policy_updates_following") == 1, 60, "the follower to attach")
    return svc


@dataclass
class Answer:
    worker: int
    prompt: int
    stream: bool
    response_id: str
    fingerprints: set[str]
    content: str

    @property
    def version(self) -> int:
        (fp,) = self.fingerprints
        return int(fp.removeprefix("policy-v"))


@dataclass
class Traffic:
    """Workers chatting in a loop (greedy, plain and streaming, two prompts) until stopped; every outcome is kept.
    Six at a time: the engine decodes them in one batch, and across a swap in one batch per version."""

    service: object
    workers: int = 6
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Traffic":
        self.threads = [threading.Thread(target=self._work, args=(w,)) for w in range(self.workers)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _work(self, worker: int) -> None:
        client = self.service.openai()
        i = 0
        while not self.stop.is_set():
            prompt, stream = (worker + i) % 2, (i // 2) % 2 == 1
            i += 1
            kw = dict(model=MODEL, messages=PROMPTS[prompt], temperature=0, max_tokens=12)
            try:
                if stream:
                    chunks = list(client.chat.completions.create(**kw, stream=True))
                    answer = Answer(worker, prompt, True, chunks[0].id, {c.system_fingerprint for c in chunks},
                                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
                else:
                    r = client.chat.completions.create(**kw)
                    answer = Answer(worker, prompt, False, r.id, {r.system_fingerprint}, r.choices[0].message.content)
            except Exception as e:  # every failure is a test failure, reported at the end
                self.failures.append(f"worker {worker}: {type(e).__name__}: {e}")
                continue
            self.answers.append(answer)

    def wait_for_version(self, version: int, timeout: float = 120) -> None:
        wait_until(lambda: any(version in _versions(a) for a in self.answers[-20:]), timeout,
                   f"answers from policy v{version}")


def _versions(a: Answer) -> set[int]:
    return {int(fp.removeprefix("policy-v")) for fp in a.fingerprints}


def _admin(svc, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{svc.admin_url}{path}", headers=kw.pop("headers", ADMIN), timeout=120, **kw)


def test_versions_swap_under_traffic_and_a_corrupted_one_is_refused(swap_service, module_broker):
    svc, store = swap_service, swap_service.state_dir / "policies"
    with Traffic(svc) as traffic:
        traffic.wait_for_version(0)
        for seed in (1, 2, 3):
            v = write_version(store, seed=seed, noise=NOISE)
            announce(module_broker.bootstrap, store, v)
            traffic.wait_for_version(v)
        bad = write_version(store, seed=4, corrupt=True)
        announce(module_broker.bootstrap, store, bad)
        wait_until(lambda: svc.metric("rlhf_policy_load_failures_total", reason="verify") == 1, 60,
                   "the corrupted version to be refused")
        served = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) >= served + 4, 60, "answers after the refusal")
        good = write_version(store, seed=5, noise=NOISE)
        announce(module_broker.bootstrap, store, good)
        traffic.wait_for_version(good)

    assert traffic.failures == []
    answers = traffic.answers
    assert all(len(a.fingerprints) == 1 for a in answers), "a response mixed policy versions"
    seen = {a.version for a in answers}
    assert seen >= {0, 1, 2, 3, good} and bad not in seen
    for w in range(traffic.workers):  # versions only move forward, so each worker's sequence does too
        mine = [a.version for a in answers if a.worker == w]
        assert mine == sorted(mine)
    secret = svc.id_secret()
    assert all(parse_response_id(secret, a.response_id).policy_version == a.version for a in answers)

    status = _admin(svc, "GET", "/admin/versions").json()
    assert status["serving"] == good and status["pinned"] is None
    assert status["latest"] == good
    assert {v["version"]: v for v in status["versions"]}[bad]["refused"].startswith("verify")

    # the Interaction events name the same version as the responses
    ids = {a.response_id: a.version for a in answers}
    svc.wait_drained()
    events = read_events(module_broker.bootstrap, ["rlhf.interactions"],
                         until=lambda evs: {e.response_id for e in evs} >= ids.keys())
    assert all(e.policy_version == ids[e.response_id] for e in events if isinstance(e, Interaction))

    # each answer is exactly what the version it names produces alone: replay it, pinned to that version
    for v in sorted(seen):
        assert _admin(svc, "POST", "/admin/pin", json={"version": v}).json()["serving"] == v
        for prompt, messages in enumerate(PROMPTS):
            replay = svc.openai().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
            assert replay.system_fingerprint == f"policy-v{v}"
            recorded = {a.content for a in answers if a.version == v and a.prompt == prompt}
            assert recorded <= {replay.choices[0].message.content}, (v, prompt)
    _admin(svc, "POST", "/admin/unpin")
    per_version = {v: {a.content for a in answers if a.version == v} for v in seen}
    assert len({frozenset(c) for c in per_version.values() if c}) > 1, "perturbed versions should answer differently"


def test_pin_rolls_back_and_holds_until_unpinned(swap_service, module_broker):
    svc, store = swap_service, swap_service.state_dir / "policies"
    latest = _admin(svc, "GET", "/admin/versions").json()["latest"]
    r = _admin(svc, "POST", "/admin/pin", json={"version": 1})
    assert r.status_code == 200 and (r.json()["serving"], r.json()["pinned"]) == (1, 1)
    assert svc.openai().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4).system_fingerprint == "policy-v1"
    assert svc.metric("rlhf_policy_pinned") == 1

    seen = svc.metric("rlhf_policy_announcements_total")
    newer = write_version(store, seed=6)
    announce(module_broker.bootstrap, store, newer)
    wait_until(lambda: svc.metric("rlhf_policy_announcements_total") > seen, 60, "the announcement to be read")
    assert _admin(svc, "GET", "/admin/versions").json()["serving"] == 1  # pinned: the announcement was ignored

    r = _admin(svc, "POST", "/admin/unpin")
    assert r.status_code == 200 and (r.json()["serving"], r.json()["pinned"]) == (newer, None)
    assert newer > latest
    assert svc.openai().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4).system_fingerprint == f"policy-v{newer}"


def test_admin_errors(swap_service):
    svc = swap_service
    versions = _admin(svc, "GET", "/admin/versions").json()["versions"]
    refused = next(v["version"] for v in versions if v["refused"])
    cases = [
        ("GET", "/admin/versions", {}, {}, 401, "invalid_api_key"),
        ("GET", "/admin/versions", {"Authorization": "Bearer wrong"}, {}, 403, "permission_denied"),
        ("GET", "/admin/versions", {"Authorization": "Bearer sk-test-key"}, {}, 403, "permission_denied"),  # an API key
        ("POST", "/admin/pin", ADMIN, {"json": {"version": 999}}, 404, "version_not_found"),
        ("POST", "/admin/pin", ADMIN, {"json": {"version": "1"}}, 400, "invalid_value"),
        ("POST", "/admin/pin", ADMIN, {"json": {"version": refused}}, 409, "policy_refused"),
    ]
    serving = _admin(svc, "GET", "/admin/versions").json()["serving"]
    assert httpx.get(f"{svc.url}/admin/versions", headers=ADMIN).status_code == 404  # only on the admin port
    for method, path, headers, kw, status, code in cases:
        r = _admin(svc, method, path, headers=headers, **kw)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, headers, kw, r.text)
    assert _admin(svc, "GET", "/admin/versions").json() | {"versions": None} == {
        "serving": serving, "pinned": None, "latest": serving, "versions": None}


def test_an_adapter_version_serves_again_after_a_rollback(swap_service, module_broker):
    """An adapter version served, rolled back from (a pin to its base), then pinned again, twice: each load of it
    is an adapter of its own on the base, so a version loaded before is never refused for its name."""
    svc, store = swap_service, swap_service.state_dir / "policies"

    def ask() -> tuple[str, str]:
        r = svc.openai().chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, max_tokens=12)
        return r.system_fingerprint, r.choices[0].message.content

    assert _admin(svc, "POST", "/admin/pin", json={"version": 0}).json()["serving"] == 0
    base = ask()
    adapter = write_adapter_version(store, seed=7, noise=NOISE)
    announce(module_broker.bootstrap, store, adapter)
    r = _admin(svc, "POST", "/admin/unpin")  # follow LATEST (the adapter) again
    assert r.json()["serving"] == adapter
    first = ask()
    assert first[0] == f"policy-v{adapter}" and first[1] != base[1], "the adapter should change the answer"
    for _ in range(2):
        assert _admin(svc, "POST", "/admin/pin", json={"version": 0}).json()["serving"] == 0  # the rollback
        assert ask() == base
        r = _admin(svc, "POST", "/admin/pin", json={"version": adapter})
        assert r.status_code == 200 and r.json()["serving"] == adapter, r.text
        assert ask() == first
    status = _admin(svc, "GET", "/admin/versions").json()
    assert {v["version"]: v for v in status["versions"]}[adapter]["refused"] is None
    _admin(svc, "POST", "/admin/unpin")
