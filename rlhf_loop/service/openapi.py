"""The public API's OpenAPI document (/openapi.json, also at BentoML's /docs.json) and the /docs page.

The handlers in service/api.py read and parse their bodies themselves (`parse`), so that
a bad body gets OpenAI's 400 rather than FastAPI's 422; FastAPI therefore cannot see the
bodies. Each route declares them instead, with the dicts below spread into its decorator:
the request body as `openapi_extra` (the pydantic model's JSON schema), the answers as
FastAPI `responses` (documentation only: nothing is re-validated at run time), and an
OpenAI-style operation id. `document()` is FastAPI's generator over those routes, plus
what only the running server knows (the served model name and its version names, its limits,
whether API keys are on) and BentoML's probes. docs/service.md, "OpenAPI", says how it gets past BentoML.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from rlhf_loop.core.contracts import Settings
from rlhf_loop.service.schemas import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ErrorResponse, FeedbackAccepted, FeedbackRequest, LoopView,
    ModelCard, ModelList, PreferenceAccepted, PreferenceRequest, model_name_pattern, version_model_id,
)

ERRORS = {  # status -> when; every error body is OpenAI's shape (ErrorResponse)
    400: "Invalid request: `invalid_json`, `invalid_value` (with the offending `param`), `unsupported_parameter`, "
         "`context_length_exceeded`; for a preference also `prompt_mismatch` (the two responses answer different "
         "prompts) and `prompt_unknown` (a response id from before ids carried their prompt).",
    401: "`invalid_api_key`: missing or wrong `Authorization: Bearer` key (only when the server has API keys).",
    403: "`permission_denied`: the vote or preference was cast by another identity (another API key, or on a server "
         "without keys another client address); only that one may withdraw it. Nothing was recorded.",
    404: "`model_not_found`, `response_not_found`, `feedback_not_found` or `preference_not_found`: the id or model "
         "is not one this service issued or serves (for a chat: a malformed model name, or a version this replica "
         "cannot serve: not in its policy store, or refused by its checks; nothing was generated or written).",
    413: "`request_too_large`: the body is over the server's byte limit.",
    429: "`rate_limit_exceeded`: a chat while the engine's queue is full, or a vote (or preference) over a vote cap "
         "of this server "
         "(per voter, or an API key's quota; per client address without keys); nothing was generated or recorded. The `Retry-After` header "
         "says in how many seconds to try again.",
    500: "`generation_failed` (type `server_error`).",
    503: "`model_not_ready` (no policy loaded yet) or `events_unavailable` (a vote or preference could not be "
         "spooled; retry).",
}


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `model` as the required JSON body."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": inline(model.model_json_schema())}}}}


def inline(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` substituted where they are used (the request
    models are not recursive): a route's openapi_extra has no components section to hold them."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rpartition("/")[2]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve({k: v for k, v in schema.items() if k != "$defs"})


RETRY_AFTER = {"Retry-After": {"description": "Seconds until the request may succeed.",
                               "schema": {"type": "integer", "minimum": 1}}}


def answers(status: int, model: type[BaseModel], description: str, *errors: int, **extra: Any) -> dict:
    """FastAPI `responses`: the success body, then each error status with OpenAI's error body."""
    return {status: {"model": model, "description": description, **extra},
            **{code: {"model": ErrorResponse, "description": ERRORS[code],
                      **({"headers": RETRY_AFTER} if code == 429 else {})} for code in errors}}


STREAM = {"text/event-stream": {"schema": {  # one event (OpenAPI 3.2 calls it itemSchema; fuzzers read both)
    "description": "With `\"stream\": true`: Server-Sent Events, one `data: <chat.completion.chunk JSON>` per "
                   "delta, then `data: [DONE]`; a failure mid-stream sends `data: <error JSON>` and ends it.",
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "if": {"const": "[DONE]"}, "else": {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [inline(ChatCompletionChunk.model_json_schema(mode="serialization")),
                                    inline(ErrorResponse.model_json_schema())]},
    }}},
}}}

CHAT = dict(
    operation_id="createChatCompletion",
    summary="Chat completion (OpenAI's API); `model` is the served name (the version serving now) or one version, "
            "`<name>@v<N>`; `system_fingerprint` names the version that answered",
    openapi_extra=json_body(ChatCompletionRequest),
    responses=answers(
        200, ChatCompletion, "The completion; with `stream`, the same as Server-Sent Events.", 400, 401, 404, 413,
        429, 500, 503, content=STREAM,
        links={"voteOnIt": {"operationId": "createFeedback", "description": "Vote on this answer.",
                            "requestBody": {"response_id": "$response.body#/id", "rating": "up"}}},
    ),
)
LIST_MODELS = dict(operation_id="listModels", summary="The served model and each version a request may name",
                   responses=answers(200, ModelList, "The served name first (`root`: the version serving now), then "
                                                     "every version this replica can serve, `<name>@v<N>`, oldest "
                                                     "first.", 401))
RETRIEVE_MODEL = dict(operation_id="retrieveModel", summary="One model: the served name or one version",
                      responses=answers(200, ModelCard, "The model.", 401, 404))
FEEDBACK = dict(
    operation_id="createFeedback",
    summary="Vote on an answer; the same voter voting again replaces the vote",
    openapi_extra=json_body(FeedbackRequest),
    responses=answers(
        202, FeedbackAccepted, "Accepted: one Feedback event spooled for Kafka.", 400, 401, 404, 413, 429, 503,
        links={"withdrawIt": {"operationId": "deleteFeedback", "description": "Withdraw this vote.",
                              "parameters": {"feedback_id": "$response.body#/id"}}},
    ),
)
WITHDRAW = dict(operation_id="deleteFeedback", summary="Withdraw a vote (a tombstone event)",
                responses=answers(202, FeedbackAccepted, "Accepted: one tombstone event spooled for Kafka.",
                                  401, 403, 404, 429, 503))
PREFERENCE = dict(
    operation_id="createPreference",
    summary="Prefer one of two answers to the same prompt (or call them a tie); the same voter stating a preference "
            "on the same pair again replaces it",
    openapi_extra=json_body(PreferenceRequest),
    responses=answers(
        202, PreferenceAccepted, "Accepted: one Preference event spooled for Kafka.", 400, 401, 404, 413, 429, 503,
        links={"withdrawIt": {"operationId": "deletePreference", "description": "Withdraw this preference.",
                              "parameters": {"preference_id": "$response.body#/id"}}},
    ),
)
WITHDRAW_PREFERENCE = dict(
    operation_id="deletePreference", summary="Withdraw a preference (a tombstone event)",
    responses=answers(202, PreferenceAccepted, "Accepted: one tombstone event spooled for Kafka; `chosen` and "
                                               "`rejected` are null (the id alone names the pair).",
                      401, 403, 404, 429, 503))
LOOP = dict(operation_id="retrieveLoop",
            summary="The loop page's data: what each replica serves, the trainer's rounds, approval by version",
            responses=answers(200, LoopView, "Read-only. `trainer.status` says whether `rounds` and `approval` came "
                                             "from the trainer (RLHF_TRAINER_URL).", 401))

_TEXT = {"text/plain": {"schema": {"type": "string"}}}
PROBES = {  # BentoML's routes on the same port (docs/service.md, "Probes and metrics")
    "/livez": ("livez", "Liveness: 503 once no policy version at all could be loaded."),
    "/readyz": ("readyz", "Readiness: 200 once a policy is loaded, 503 before."),
    "/metrics": ("metrics", "Prometheus text: BentoML's metrics and the service's own (rlhf_*)."),
}


def document(app: FastAPI, settings: Settings, *, max_stop: int) -> dict:
    """The OpenAPI 3.1 document of this server: its routes, its limits, BentoML's probes."""
    # a copy: FastAPI puts the routes' openapi_extra dicts into the document as they are
    doc = copy.deepcopy(get_openapi(title="rlhf-loop chat + feedback API", version="1", routes=app.routes,
                                    description="OpenAI-compatible chat completions with thumbs feedback and pairwise "
                                                "preferences; every error is OpenAI's `{\"error\": {...}}`. The "
                                                "playground is at `/`, the loop page at `/loop`."))
    for item in doc["paths"].values():
        for operation in item.values():
            # FastAPI documents a 422 for any route with parameters; ours never answers one
            operation["responses"].pop("422", None)
            if settings.api_key_set():
                operation["security"] = [{"apiKey": []}]
    for schema in ("HTTPValidationError", "ValidationError"):
        doc.get("components", {}).get("schemas", {}).pop(schema, None)
    if settings.api_key_set():
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    _limit(doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"],
           settings, max_stop)
    for path, (operation_id, summary) in PROBES.items():
        doc["paths"][path] = {"get": {"operationId": operation_id, "summary": summary, "tags": ["probes"],
                                      "responses": {"200": {"description": "OK", "content": _TEXT},
                                                    "503": {"description": "Not alive / not ready",
                                                            "content": _TEXT}}}}
    return doc


def _limit(request: dict, s: Settings, max_stop: int) -> None:
    """What the chat handler checks against the settings, in the request's schema (the model
    alone cannot say it: the limits are per deployment)."""
    p = request["properties"]
    p["model"]["pattern"] = model_name_pattern(s.served_model_name)
    p["model"]["examples"] = [s.served_model_name, version_model_id(s.served_model_name, 0)]
    p["model"]["description"] = (f"`{s.served_model_name}`: the version serving now; `{s.served_model_name}@v<N>`: "
                                 "version N, if this replica can serve it (GET /v1/models), else 404")
    p["messages"]["maxItems"] = s.max_messages
    for name, maximum in (("max_tokens", s.max_tokens_limit), ("max_completion_tokens", s.max_tokens_limit),
                          ("n", s.max_n)):
        _branch(p[name], "integer")["maximum"] = maximum
    _branch(p["stop"], "array")["maxItems"] = max_stop


def _branch(prop: dict, type_: str) -> dict:
    """The `type_` member of an optional field's anyOf."""
    (branch,) = [b for b in prop["anyOf"] if b.get("type") == type_]
    return branch


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>rlhf-loop API</title>
  <link rel="stylesheet" type="text/css" href="/static_content/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="/static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                                presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
                                layout: "StandaloneLayout"});
  </script>
</body>
</html>
"""
