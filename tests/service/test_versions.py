"""A version per request: `model: rlhf-policy@v<N>` is answered by version N, whatever serves now.

    .venv/bin/python -m pytest -q tests/service/test_versions.py

In-process, the version manager (service/versions.py) on a real engine and policy store: versions
named are loaded on demand beside the serving one, the least recently named let go beyond
`named_versions_kept`, a corrupted version refused and never served, an unknown one not recorded as
refused. Then a real `bentoml serve` chosen between by the official `openai` client: a full-weight
and a LoRA version published, each request answered by the version it names (exactly what a pin to
it answers), `/v1/models` listing them, 404s in OpenAI's shape that write nothing, and a vote on an
old version's answer attributed to that version on the broker and in the trainer's label store.
"""

from __future__ import annotations

import gc
import weakref

import httpx
import openai
import pytest
from service_helpers import API_KEY, MODEL, read_events, write_adapter_version, write_version

from rlhf_loop.core.contracts import Feedback, Interaction, Settings, parse_response_id
from rlhf_loop.core.models import ensure_policy_store
from rlhf_loop.service.engine import Engine
from rlhf_loop.service.scheduler import Limits
from rlhf_loop.service.versions import UnknownVersion, VersionManager, VersionRefused

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [{"role": "user", "content": "What do you think of coffee?"}]
NOISE = 0.5  # versions far enough apart that their greedy answers differ (as in test_swap.py)


# ---------------------------------------------------------------------------- in-process


@pytest.fixture
def manager(tmp_path, base_model_dir):
    """manager(named_versions_kept) -> a VersionManager serving v0 of a store holding v0 (the embedded model),
    v1 (full weights), v2 (a LoRA adapter over v0) and v3 (full weights whose file no longer matches its hash)."""
    settings = Settings(state_dir=tmp_path, model=base_model_dir, device="cpu", dtype="float32")
    store = ensure_policy_store(settings)
    write_version(store.root, seed=1, noise=NOISE)
    write_adapter_version(store.root, seed=2, noise=NOISE)
    write_version(store.root, seed=3, corrupt=True)
    store.set_latest(0)
    engine = Engine(Limits(max_running_seqs=8, max_batched_tokens=256, max_waiting_requests=8))

    def make(kept: int) -> VersionManager:
        vm = VersionManager(settings.model_copy(update={"named_versions_kept": kept}), engine)
        vm.offer(0, source="poll")  # what the start thread does, without the Kafka follower
        assert vm.current.version == 0
        return vm

    yield make
    engine.close()


def test_named_versions_load_beside_the_serving_one_and_the_least_recently_named_goes(manager):
    vm = manager(1)
    serving = vm.current
    full = vm.named(1)
    assert full.version == 1 and full.adapter is None and full.model is not serving.model
    assert vm.in_memory(1) is full and vm.named(1) is full, "kept: named again, not loaded again"
    gone = weakref.ref(full.model)
    del full

    adapter = vm.named(2)  # kept = 1: v1 goes
    assert adapter.version == 2 and adapter.adapter is not None
    assert adapter.base is serving.base, "an adapter over the serving base loads onto it: a few MB, not a model"
    assert vm.current is serving, "naming a version never swaps it in"
    gc.collect()
    assert gone() is None, "the least recently named version's weights were freed"
    assert vm.in_memory(1) is None
    assert vm.named(0) is serving, "the serving version by its own name"
    assert [i["version"] for i in vm.servable()] == [0, 1, 2, 3]


def test_a_corrupted_version_is_refused_and_never_served_and_an_unknown_one_is_not_recorded(manager):
    vm = manager(2)
    with pytest.raises(VersionRefused) as e:
        vm.named(3)
    assert e.value.reason == "verify"
    with pytest.raises(VersionRefused) as e:  # not tried again: versions are immutable
        vm.named(3)
    assert e.value.reason == "refused" and vm.refused[3].startswith("verify")
    with pytest.raises(UnknownVersion):
        vm.named(99)
    assert 99 not in vm.refused, "a name asked for before its version exists is no refusal"
    assert [i["version"] for i in vm.servable()] == [0, 1, 2]
    status = {v["version"]: v for v in vm.status()["versions"]}
    assert (status[0]["loaded"], status[1]["loaded"], status[3]["loaded"]) == (True, False, False)


def test_with_none_kept_only_versions_in_memory_can_be_named(manager):
    vm = manager(0)
    assert vm.named(0) is vm.current
    with pytest.raises(UnknownVersion):
        vm.named(1)
    assert [i["version"] for i in vm.servable()] == [0]


# ---------------------------------------------------------------------------- a real service


@pytest.fixture(scope="module")
def versions_service(start_service, module_broker):
    """A service serving LATEST = v2 of a store holding v0 (base), v1 (full weights) and v2 (a LoRA adapter
    over v0); LATEST polling slowed right down, so nothing moves unless a test moves it."""
    svc = start_service(module_broker.bootstrap, admin_key=ADMIN_KEY, policy_poll_s="3600")
    store = svc.state_dir / "policies"
    full, adapter = write_version(store, seed=1, noise=NOISE), write_adapter_version(store, seed=2, noise=NOISE)
    assert (full, adapter) == (1, 2)
    pin(svc, adapter)
    return svc


def pin(svc, version: int | None) -> None:
    path, body = ("/admin/unpin", None) if version is None else ("/admin/pin", {"version": version})
    r = httpx.post(f"{svc.admin_url}{path}", headers=ADMIN, json=body, timeout=120)
    assert r.status_code == 200, r.text


def ask(svc, model: str, **kw):
    return svc.openai().chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=12, **kw)


def test_each_request_is_answered_by_the_version_it_names(versions_service):
    svc = versions_service
    answers = {}
    for v in (0, 1, 2):
        r = ask(svc, f"{MODEL}@v{v}")
        assert (r.model, r.system_fingerprint) == (f"{MODEL}@v{v}", f"policy-v{v}")
        assert parse_response_id(svc.id_secret(), r.id).policy_version == v
        answers[v] = r.choices[0].message.content
        chunks = list(svc.openai().chat.completions.create(model=f"{MODEL}@v{v}", messages=PROMPT, temperature=0,
                                                            max_tokens=12, stream=True))
        assert {c.system_fingerprint for c in chunks} == {f"policy-v{v}"} and {c.model for c in chunks} == {
            f"{MODEL}@v{v}"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[v]
    assert len(set(answers.values())) == 3, f"the versions' weights differ, so should their answers: {answers}"
    current = ask(svc, MODEL)
    assert (current.model, current.system_fingerprint) == (MODEL, "policy-v2")  # the pin says what the name means
    assert current.choices[0].message.content == answers[2]

    # each named answer is exactly what that version answers when it serves: pinned to it; and a pin does
    # not change what a named request gets
    for v in (0, 1):
        pin(svc, v)
        assert ask(svc, MODEL).choices[0].message.content == answers[v]
        assert ask(svc, f"{MODEL}@v2").choices[0].message.content == answers[2]
    pin(svc, 2)
    assert svc.metric("rlhf_policy_named_loads_total") >= 1


def test_models_lists_the_served_name_and_each_version(versions_service):
    svc = versions_service
    cards = {m.id: m for m in svc.openai().models.list().data}
    assert list(cards) == [MODEL, f"{MODEL}@v0", f"{MODEL}@v1", f"{MODEL}@v2"]
    assert cards[MODEL].root == f"{MODEL}@v2"
    assert (cards[f"{MODEL}@v0"].parent, cards[f"{MODEL}@v0"].root) == (None, f"{MODEL}@v0")
    assert (cards[f"{MODEL}@v1"].parent, cards[f"{MODEL}@v1"].root) == (f"{MODEL}@v0", f"{MODEL}@v1")
    assert (cards[f"{MODEL}@v2"].parent, cards[f"{MODEL}@v2"].root) == (f"{MODEL}@v0", f"{MODEL}@v0")  # an adapter
    manifest = httpx.get(f"{svc.admin_url}/admin/versions", headers=ADMIN).json()["versions"]
    assert [cards[f"{MODEL}@v{m['version']}"].created for m in manifest] == [m["created"] for m in manifest]
    one = svc.openai().models.retrieve(f"{MODEL}@v1")
    assert (one.id, one.parent, one.created) == (f"{MODEL}@v1", f"{MODEL}@v0", cards[f"{MODEL}@v1"].created)


@pytest.mark.parametrize("model", [f"{MODEL}@v99", f"{MODEL}@v", f"{MODEL}@v01", f"{MODEL}@1", f"{MODEL}@v-1",
                                   f"{MODEL}@v3x", f"{MODEL}:v1", "gpt-4o", f"{MODEL}@v1234567890"])
def test_a_version_this_replica_cannot_serve_is_a_404_and_writes_nothing(versions_service, model):
    svc = versions_service
    spooled = svc.metric("rlhf_events_spooled_total")
    with pytest.raises(openai.NotFoundError) as e:
        ask(svc, model)
    assert (e.value.status_code, e.value.code, e.value.param) == (404, "model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        svc.openai().models.retrieve(model)
    assert svc.metric("rlhf_events_spooled_total") == spooled


def test_a_corrupted_version_is_listed_until_named_then_refused(versions_service):
    svc = versions_service
    bad = write_version(svc.state_dir / "policies", seed=4, corrupt=True)  # LATEST moves to it: the pin holds
    assert f"{MODEL}@v{bad}" in {m.id for m in svc.openai().models.list().data}  # not checked until asked for
    with svc.http(headers=AUTH) as http:
        r = http.post("/v1/chat/completions", json={"model": f"{MODEL}@v{bad}", "messages": PROMPT, "max_tokens": 4})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert svc.metric("rlhf_policy_load_failures_total", reason="verify") == 1
    assert f"{MODEL}@v{bad}" not in {m.id for m in svc.openai().models.list().data}
    assert ask(svc, f"{MODEL}@v1").system_fingerprint == "policy-v1", "other versions serve on"


def test_a_vote_on_an_old_versions_answer_counts_for_that_version(versions_service, module_broker, tmp_path):
    from rlhf_loop.trainer.store import LabelStore

    svc = versions_service
    old, new = ask(svc, f"{MODEL}@v1", user="eve"), ask(svc, MODEL, user="eve")
    with svc.http(headers=AUTH) as http:
        for r, rating in ((old, "up"), (new, "down")):
            assert http.post("/v1/feedback", json={"response_id": r.id, "rating": rating, "user": "eve"}).status_code == 202
    assert svc.metric("rlhf_votes_total", rating="up", policy_version="1") == 1
    svc.wait_drained()
    ids = {old.id, new.id}
    events = read_events(module_broker.bootstrap, ["rlhf.interactions", "rlhf.feedback"],
                         until=lambda evs: sum(e.response_id in ids for e in evs) >= 4)
    mine = [e for e in events if e.response_id in ids]
    (i_old,) = [e for e in mine if isinstance(e, Interaction) and e.response_id == old.id]
    assert (i_old.policy_version, i_old.model) == (1, f"{MODEL}@v1")
    (i_new,) = [e for e in mine if isinstance(e, Interaction) and e.response_id == new.id]
    assert (i_new.policy_version, i_new.model) == (2, MODEL)

    # the trainer's join attributes each vote to the version that wrote the answer
    labels = LabelStore(tmp_path / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600, prompt_pool_size=8)
    try:
        labels.apply_batch(mine, {})
        assert labels.approval_by_version() == {1: (1, 0), 2: (0, 1)}
        assert {(e.response_id, e.policy_version) for e in labels.examples()} == {(old.id, 1), (new.id, 2)}
    finally:
        labels.close()
    assert sum(isinstance(e, Feedback) for e in mine) == 2
