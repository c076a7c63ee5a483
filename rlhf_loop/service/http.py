"""HTTP plumbing shared by the public API (service/api.py) and the admin API (service/admin.py).

    app = new_app(title)         # a FastAPI app: OpenAI's error shape everywhere, requests counted
    raise APIError(404, "...", param="model", code="model_not_found")
    body = parse(Model, await read_body(request, limit))     # 413 over the limit, 400 naming the param
    token = bearer_token(request)

Bodies are read and parsed here, not by FastAPI, so that size limits hold for streamed
bodies and validation errors become OpenAI's 400 with the offending `param` named.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_loop.service import metrics
from rlhf_loop.service.schemas import ErrorBody, ErrorResponse


# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = {**({"WWW-Authenticate": "Bearer"} if status == 401 else {}), **(headers or {})}

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status,
                            headers=self.headers or None)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """pydantic's ('messages', 0, 'role') -> OpenAI's 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).isidentifier() or part in _TYPE_TAGS:
            continue  # the union-member labels pydantic adds to the path ('str', 'list[TextPart]', ...)
        else:
            out += f".{part}" if out else str(part)
    return out or None


Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, "We could not parse the JSON body of your request. "
                                f"({err['msg']})", code="invalid_json") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json") from None
        param = _param(err["loc"])
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}" if param else err["msg"],
                       param=param, code="invalid_value") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 when it is (declared or actually) over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    stream = request.stream()
    if not too_big:
        buf = bytearray()
        async for chunk in stream:
            buf += chunk
            if len(buf) > limit:
                too_big = True
                break
        else:
            return bytes(buf)
    drained = 0  # read (a bounded amount of) the rest, so the client sees our 413 rather than a reset
    async for chunk in stream:
        drained += len(chunk)
        if drained > 16 * limit:
            break
    raise APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


# ---------------------------------------------------------------------------- apps


class CountRequests:
    """ASGI middleware: rlhf_requests_total{endpoint, status}."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            metrics.requests.labels(endpoint=_endpoint(scope["path"]), status=str(status)).inc()


def _endpoint(path: str) -> str:
    for prefix, name in (("/v1/chat/completions", "chat"), ("/v1/feedback", "feedback"), ("/v1/preferences", "preferences"),
                         ("/v1/models", "models"), ("/v1/loop", "loop"), ("/admin/", "admin")):
        if path.startswith(prefix):
            return name
    return "other"


def new_app(title: str) -> FastAPI:
    """A FastAPI app whose every error is OpenAI's JSON and whose requests are counted."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CountRequests)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    return app


class PathAcrossLines(PathConvertor):
    """Starlette's `{x:path}` matches `.*`, so not a path holding a newline (`%0A`), and BentoML's
    mount of this app (its path is `/{path:path}`) would pass such a request by: BentoML's
    plain-text 404 would answer instead of OpenAI's error (found by fuzzing). Registered
    before any route is made, ours and the mount alike (service/service.py imports the API,
    hence this module, before BentoML builds its app), it makes every `path` parameter match across lines."""

    regex = r"[\s\S]*"


register_url_convertor("path", PathAcrossLines())


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
