"""The BentoML service: the policy, the generation engine and the event log behind the HTTP API.

    bentoml serve service.service:ChatService      (what `rlhf serve` runs, see service/serve.py)

The routes live in service/api.py (a FastAPI app mounted here, as BentoML's own
OpenAI-compatible LLM services do); BentoML adds /livez, /readyz (ready once a policy
is loaded, via __is_ready__) and /metrics (its own metrics and ours, service/metrics.py).
The admin API (service/admin.py) listens on its own port, RLHF_ADMIN_PORT.
One worker process; its engine (service/engine.py) decodes every running request in one batch.
"""

from __future__ import annotations

import logging
import time

import bentoml
import torch

from rlhf_loop.core.broker import describe_connection
from rlhf_loop.core.contracts import Settings
from rlhf_loop.service.admin import AdminServer, make_admin_app
from rlhf_loop.service.api import app
from rlhf_loop.service.engine import Engine
from rlhf_loop.service.events import EventLog
from rlhf_loop.service.limits import VoteLimits
from rlhf_loop.service.loop import ReplicaBoard
from rlhf_loop.service.versions import VersionManager
from rlhf_loop.service.scheduler import Limits

log = logging.getLogger(__name__)


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="rlhf-chat",
    workers=1,
    traffic={"timeout": 300, "concurrency": 32, "max_concurrency": 256},
    # BentoML samples no traces unless tracing.sample_rate is set, yet its OpenTelemetry middleware makes
    # a span for every ASGI message, which for a stream is one per token (~12 % of chat throughput at
    # concurrency 32 in bench/serve.py): chat stays out of it
    tracing={"excluded_urls": ["/v1/chat/completions"]},
)
class ChatService:
    def __init__(self) -> None:
        logging.getLogger("rlhf_loop").setLevel(logging.INFO)  # BentoML's root level is WARNING; swaps are worth seeing
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # a line per reconnect attempt; ours say it once per retry
        self.settings = Settings()
        self.started = int(time.time())
        self.api_keys = self.settings.api_key_set()
        self.id_secret = self.settings.id_secret()
        # the engine's forward passes get every core torch would use but one, which the event loop needs
        # (HTTP, tokenizing, SSE): torch's intra-op threads spin, and on an oversubscribed core they stall
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
        self.events = EventLog.open(self.settings)  # resumes draining anything spooled by a previous run
        self.engine = Engine(Limits(self.settings.engine_max_running_seqs, self.settings.engine_max_batched_tokens,
                                    self.settings.engine_max_waiting_requests))
        self.vote_limits = VoteLimits(self.settings)
        self.versions = VersionManager(self.settings, self.engine)
        self.versions.start()  # loads LATEST on a background thread; /readyz says when it is in
        self.board = ReplicaBoard(self.settings, self.versions).start()  # what it serves, for the loop page
        self.admin = AdminServer(make_admin_app(self.settings, self.versions), self.settings.host,
                                 self.settings.admin_port).start()
        log.info("rlhf-chat starting: model %r, policy store %s, kafka %s, spool %s, admin API on %s, "
                 "engine %s with %d torch threads", self.settings.served_model_name, self.settings.policy_dir,
                 describe_connection(self.settings), self.events.spool.root, self.admin.address,
                 self.engine.limits, torch.get_num_threads())

    def __is_ready__(self) -> bool:
        return self.versions.current is not None

    def __is_alive__(self) -> bool:
        return self.versions.failed is None  # no version at all could be loaded: restart me

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.admin.stop()
        self.board.stop()
        self.versions.close()
        self.engine.close()
        self.events.close(timeout=5)
