import json
import uuid

import pytest
from pydantic import ValidationError

from rlhf_loop.core.contracts import (
    Feedback, Interaction, PolicyUpdate, Sampling, Settings, feedback_id_for, make_response_id,
    split_feedback_id, verify_response_id,
)


def test_response_ids_verify_only_with_the_issuing_secret():
    rid = make_response_id(b"secret-a")
    assert verify_response_id(b"secret-a", rid)
    assert not verify_response_id(b"secret-b", rid)
    forged = rid[:-1] + ("0" if rid[-1] != "0" else "1")
    assert not verify_response_id(b"secret-a", forged)
    assert not verify_response_id(b"secret-a", "chatcmpl-abc")
    assert not verify_response_id(b"secret-a", "")


def test_feedback_ids_are_stable_per_user_and_carry_the_response_id():
    rid = make_response_id(b"k")
    a1 = feedback_id_for(rid, 0, None, "alice")
    assert a1 == feedback_id_for(rid, 0, None, "alice")  # second vote replaces the first
    assert a1 != feedback_id_for(rid, 0, None, "bob")
    assert a1 != feedback_id_for(rid, 1, None, "alice")
    assert feedback_id_for(rid, 0, "client-key", "alice") == f"{rid}:client-key"
    assert split_feedback_id(a1) == (rid, a1.partition(":")[2])
    assert split_feedback_id(f"{rid}:client-key") == (rid, "client-key")
    assert split_feedback_id(rid) is None and split_feedback_id(f"{rid}:bad key!") is None


def _interaction(**kw):
    base = dict(
        response_id="chatcmpl-x-y", policy_version=0, model="m",
        messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2], completion="hello",
        completion_token_ids=[3], finish_reason="stop",
        sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8, seed=None),
    )
    return Interaction(**{**base, **kw})


def test_events_round_trip_through_json():
    for ev in (
        _interaction(),
        Feedback(feedback_id="f", response_id="r", rating=1),
        Feedback(feedback_id="f", response_id="r", rating=None, deleted=True),
        PolicyUpdate(version=2, parent_version=1, uri="/p/v2", files={"a": "0" * 64}, metrics={"kl": 0.1}),
    ):
        back = type(ev).model_validate_json(ev.to_bytes())
        assert back == ev
        assert json.loads(ev.to_bytes())["schema_version"] == 1
        assert isinstance(back.event_id, uuid.UUID)


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"finish_reason": "eos"},
    {"unknown_field": 1},
])
def test_interaction_schema_rejects_bad_events(bad):
    with pytest.raises(ValidationError):
        _interaction(**bad)


def test_feedback_rating_is_plus_or_minus_one():
    with pytest.raises(ValidationError):
        Feedback(feedback_id="f", response_id="r", rating=2)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("RLHF_API_KEYS", "k1, k2,")
    monkeypatch.setenv("RLHF_TOPIC_FEEDBACK", "fb")
    s = Settings()
    assert s.state_dir == tmp_path and s.policy_dir == tmp_path / "policies"
    assert s.api_key_set() == {"k1", "k2"}
    assert s.topic_feedback == "fb"
    assert "k1" not in repr(s)  # secrets stay out of logs
    monkeypatch.setenv("RLHF_PORT", "not-a-port")
    with pytest.raises(ValidationError):
        Settings()


def test_id_secret_is_shared_through_the_state_dir_when_not_configured(tmp_path):
    a = Settings(state_dir=tmp_path).id_secret()
    assert a == Settings(state_dir=tmp_path).id_secret() and len(a) == 64
    assert Settings(state_dir=tmp_path, response_id_secret="s3cret").id_secret() == b"s3cret"
