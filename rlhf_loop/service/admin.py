"""The admin API, on its own port (RLHF_ADMIN_PORT) so that a NetworkPolicy can keep it private.

    GET  /admin/versions        the store's versions, the one serving, the pin
    POST /admin/pin {version}   serve that version (rollback) and ignore announcements/LATEST
    POST /admin/unpin           follow LATEST again

Auth: `Authorization: Bearer <RLHF_ADMIN_KEY>`. No bearer token: 401. A wrong token (an API
key included): 403. RLHF_ADMIN_KEY unset: 403 for every token, i.e. the admin API is off
unless a key is configured. A pin holds for this replica only.

The loop page (/loop, on the public port: another origin) calls these from the browser, so
they answer CORS requests from any origin. That opens nothing: the key travels only in the
Authorization header, which a browser never adds by itself (no cookies), so a page from
elsewhere without the key gets the same 401 as any other client.

BentoML serves one port per service, so this is a second, small uvicorn server that the
service starts on a thread of its worker process and stops in its shutdown hook.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from rlhf_loop.core.contracts import Settings
from rlhf_loop.service.http import APIError, bearer_token, new_app, parse, read_body
from rlhf_loop.service.versions import UnknownVersion, VersionManager, VersionRefused
from rlhf_loop.service.schemas import PinRequest


def make_admin_app(settings: Settings, versions: VersionManager) -> FastAPI:
    app = new_app("rlhf-loop admin API")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"])
    admin_key = settings.admin_key.get_secret_value()

    def require_admin(request: Request) -> None:
        token = bearer_token(request)
        if token is None:
            raise APIError(401, "The admin API needs 'Authorization: Bearer <admin key>'.", code="invalid_api_key")
        if not admin_key:
            raise APIError(403, "The admin API is disabled: RLHF_ADMIN_KEY is not set.", code="admin_disabled")
        if not hmac.compare_digest(token.encode(), admin_key.encode()):
            raise APIError(403, "This key may not use the admin API.", code="permission_denied")

    @app.get("/admin/versions", dependencies=[Depends(require_admin)])
    async def list_versions():
        return await anyio.to_thread.run_sync(versions.status)

    @app.post("/admin/pin", dependencies=[Depends(require_admin)])
    async def pin(request: Request):
        req = parse(PinRequest, await read_body(request, settings.max_body_bytes))
        try:
            await anyio.to_thread.run_sync(versions.pin, req.version)  # loads and verifies first
        except UnknownVersion:
            raise APIError(404, f"No policy version {req.version} in the store.", param="version",
                           code="version_not_found") from None
        except VersionRefused as e:
            raise APIError(409, str(e), param="version", code="policy_refused") from None
        return await anyio.to_thread.run_sync(versions.status)

    @app.post("/admin/unpin", dependencies=[Depends(require_admin)])
    async def unpin():
        await anyio.to_thread.run_sync(versions.unpin)  # loads LATEST before answering
        return await anyio.to_thread.run_sync(versions.status)

    return app


class AdminServer:
    """uvicorn serving the admin app on a daemon thread with its own event loop."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.address = f"{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._run, name="admin-api", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout: float = 10.0) -> "AdminServer":
        """Start listening; raise if the port cannot be bound (a misconfiguration should stop the start)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the admin API could not listen on {self.address}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
