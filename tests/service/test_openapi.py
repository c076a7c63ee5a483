"""The OpenAPI document of a real `bentoml serve` process, and schemathesis fuzzing the service from it.

    .venv/bin/python -m pytest -q tests/service/test_openapi.py

The fuzz run is schemathesis's CLI (`st run`) against the live service: every operation,
positive and negative data, and the stateful links (chat -> vote on the answer -> withdraw
the vote), bounded by FUZZ_EXAMPLES per operation and a fixed seed. Afterwards the events on
Kafka are counted against the requests the service accepted: a rejected request writes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_helpers import API_KEY, MODEL, read_events

from rlhf_loop.core.contracts import Interaction, Settings
from rlhf_loop.service.api import app
from rlhf_loop.service.openapi import inline
from rlhf_loop.service.schemas import ChatCompletionRequest, FeedbackRequest, PreferenceRequest

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FUZZ_EXAMPLES = 100  # per operation and phase: about 1,300 cases, 30 s on 2 shared cores
FUZZ_SEED = 4
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "negative_data_rejection", "ignored_auth")


@pytest.fixture(scope="module")
def doc(service) -> dict:
    return httpx.get(f"{service.url}/openapi.json").json()


def without_nulls(node):
    """FastAPI serialises the document without null values (e.g. `"default": null`)."""
    if isinstance(node, dict):
        return {k: without_nulls(v) for k, v in node.items() if v is not None}
    return [without_nulls(v) for v in node] if isinstance(node, list) else node


def test_every_public_route_is_documented_with_its_models(doc):
    routes = {(r.path_format, m.lower()) for r in app.routes if getattr(r, "include_in_schema", False) for m in r.methods}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes and routes <= documented
    assert {("/livez", "get"), ("/readyz", "get"), ("/metrics", "get")} <= documented, "BentoML's probes, same port"
    for path, method in routes:
        op = doc["paths"][path][method]
        assert op["operationId"] and op["summary"]
        assert op["security"] == [{"apiKey": []}], "this service has API keys on"
        assert "422" not in op["responses"], "our handlers answer 400, never FastAPI's 422"
        for status, response in op["responses"].items():
            (media,) = [m for m in response["content"] if m == "application/json"]
            ref = response["content"][media]["schema"]["$ref"].rpartition("/")[2]
            assert ref in doc["components"]["schemas"]
            assert (ref == "ErrorResponse") == (status >= "400"), (path, status)
    assert doc["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}


def test_request_bodies_are_the_pydantic_models_with_this_servers_limits(doc):
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    feedback = doc["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert feedback == without_nulls(inline(FeedbackRequest.model_json_schema()))
    preference = doc["paths"]["/v1/preferences"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert preference == without_nulls(inline(PreferenceRequest.model_json_schema()))
    assert preference["additionalProperties"] is False and set(preference["required"]) == {"chosen", "rejected"}
    model = without_nulls(inline(ChatCompletionRequest.model_json_schema()))
    assert chat["required"] == model["required"] and chat["properties"].keys() == model["properties"].keys()
    props = chat["properties"]
    assert props["model"]["pattern"] == f"^{MODEL}(@v(0|[1-9][0-9]{{0,8}}))?$"  # the served name, or one version of it
    assert props["messages"]["maxItems"] == 64  # RLHF_MAX_MESSAGES
    assert {b.get("maximum") for b in props["max_tokens"]["anyOf"]} == {256, None}  # RLHF_MAX_TOKENS_LIMIT
    assert {b.get("maximum") for b in props["n"]["anyOf"]} == {4, None}  # RLHF_MAX_N
    assert props["messages"]["items"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    links = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["links"]
    assert links["voteOnIt"]["operationId"] == "createFeedback"


def test_bentoml_docs_json_and_the_docs_page_show_the_same_document(service, doc):
    assert httpx.get(f"{service.url}/docs.json").json() == doc
    page = httpx.get(f"{service.url}/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert "googletagmanager" not in page.text and "https://" not in page.text, "nothing loaded from outside"
    for asset in ("/static_content/swagger-ui-bundle.js", "/static_content/swagger-ui.css"):
        assert httpx.get(f"{service.url}{asset}").status_code == 200


def test_cases_the_fuzzer_found_stay_fixed(service):
    with service.http(headers=AUTH) as http:
        # a top_p below float32's smallest number dropped every token: 500 from torch.multinomial
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                    "top_p": 5e-324, "max_tokens": 4})
        assert r.status_code == 200, r.text
        # a newline in the path passed BentoML's mount of our app by: a plain-text 404, not OpenAI's
        r = http.delete("/v1/feedback/a%0Ab")
        assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_not_found"


def test_schemathesis_finds_nothing_and_rejected_requests_write_nothing(service, module_broker, doc, tmp_path, capsys):
    report = tmp_path / "schemathesis.json"
    # schemathesis reads 20 events of a stream, then leaves it: a chat stream left early is (rightly) no
    # Interaction, which the count below could not tell from a lost one. The longest stream the server's
    # limits allow (a chunk per token of each choice, with logprobs, its role and finish chunks, usage, [DONE])
    # is read whole
    limits = Settings()  # the service's (conftest starts it with the defaults)
    config = tmp_path / "schemathesis.toml"
    config.write_text(f"max-stream-events = {limits.max_n * (limits.max_tokens_limit + 2) + 2}\n")
    cmd = [str(Path(sys.executable).with_name("st")), "--config-file", str(config), "run", f"{service.url}/openapi.json",
           "--header", f"Authorization: Bearer {API_KEY}", "--checks", ",".join(CHECKS),
           "--max-examples", str(FUZZ_EXAMPLES), "--seed", str(FUZZ_SEED), "--workers", "1",
           "--request-timeout", "60", "--report", "json", "--report-json-path", str(report)]
    # cwd: schemathesis keeps its example database and reports in the working directory
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_COLOR": "1"})
    result = json.loads(report.read_text())
    cases, ops = result["test_cases"], result["operations"]["tested"]
    with capsys.disabled():
        print(f"\nschemathesis {result['schemathesis_version']} (seed {FUZZ_SEED}): {ops} operations, "
              f"{cases['generated']} cases, {len(result['failures'])} failures, {len(result['errors'])} errors, "
              f"{result['running_time']:.0f} s")
    assert run.returncode == 0 and not result["failures"] and not result["errors"], run.stdout[-6000:]
    documented = sum(len(item) for item in doc["paths"].values())  # every operation, BentoML's probes included
    assert ops == documented >= 11 and cases["generated"] >= documented * FUZZ_EXAMPLES
    assert all(p["status"] == "success" for name, p in result["phases"].items() if name != "examples"), result["phases"]

    # every event on Kafka is owed to an accepted request: one Interaction per choice of an
    # answered chat (one response id each), one Feedback (Preference) per accepted vote (preference) or withdrawal
    service.wait_drained()
    spooled = service.metric("rlhf_events_spooled_total")
    events = read_events(module_broker.bootstrap, ["rlhf.interactions", "rlhf.feedback"],
                         until=lambda ev: len(ev) >= spooled)
    answered = service.metric("rlhf_requests_total", endpoint="chat", status="200")
    votes = service.metric("rlhf_requests_total", endpoint="feedback", status="202")
    preferences = service.metric("rlhf_requests_total", endpoint="preferences", status="202")
    assert len(events) == spooled
    assert len({e.response_id for e in events if isinstance(e, Interaction)}) == answered > 0
    assert sum(not isinstance(e, Interaction) for e in events) == votes + preferences and votes > 0, \
        "the stateful links voted and withdrew"
