"""Influence caps at the API: who a vote is from, and how many votes that one may cast per time window, per replica.

    limits = VoteLimits(settings)
    caller = limits.caller(secret, api_key, address, user)   # api_key None when the server has no keys
    refusal = limits.admit(caller)                           # None, or the cap reached (nothing counted)

The trust model (docs/service.md, "Vote caps"). An API key belongs to an app that vouches for
its users: under a key the *identity* is the key and the *voter* the key's `user` (the key
itself for a vote that names none). Without keys nothing vouches for `user`: identity and
voter are the client address, and `user` is kept as data only. Identities are HMACs with the
server secret (`key:<hash>`, `address:<hash>`): raw keys and addresses are never kept or written.

Two caps, each a token bucket (capacity = the limit, refilled at limit / window: a burst of
`limit`, then `limit` per window):
- per voter, `vote_rate_limit` votes;
- per identity as a whole, its quota of votes *and* withdrawals: a key's own (`key=N` in
  RLHF_API_KEYS) or `vote_key_rate_limit`; an address's is `vote_rate_limit` (it is one voter).
So one key minting users, or one address naming any users it likes, gets its quota and no more.
A refused vote takes nothing from any bucket, and the caller answers 429 with Retry-After
before writing anything.

Memory is bounded: at most MAX_BUCKETS per cap, the least recently used dropped first (a
dropped bucket comes back full; the identity quota is what bounds voter churn, and identities
are as many as keys, or as addresses). The counts live in this process: N replicas allow N
times a cap.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from rlhf_loop.core.contracts import Settings

MAX_BUCKETS = 100_000  # ~100 bytes each


@dataclass(frozen=True)
class Caller:
    """Who sent a vote, as the service authenticated it: what its Feedback event carries, and its quota."""

    identity: str  # "key:<hash>" or "address:<hash>"
    voter: str  # "<identity>/<user>" under a key, else the identity
    quota: int  # the identity's votes + withdrawals per window; 0 = no cap


@dataclass(frozen=True)
class Refusal:
    kind: str  # whose cap was reached: "voter", or the identity's kind, "key" / "address" (a metric label)
    limit: int  # that cap, per window
    retry_after_s: int  # whole seconds until one more is allowed


def identity_of(secret: bytes, api_key: str | None, address: str) -> str:
    """`key:<HMAC of the API key>` when the server has keys (`api_key` is the request's), else
    `address:<HMAC of the client address>`: stable across replicas that share the secret."""
    kind, name = ("key", api_key) if api_key is not None else ("address", address)
    digest = hmac.new(secret, f"{kind}\x00{name}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}:{digest[:16]}"


class TokenBuckets:
    """One token bucket per name, each refilled at its capacity per `window_s`; LRU-bounded."""

    def __init__(self, window_s: float, max_buckets: int = MAX_BUCKETS):
        self.window_s, self.max_buckets = window_s, max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)

    def tokens(self, name: str, capacity: int, now: float) -> float:
        tokens, at = self._buckets.get(name, (capacity, now))
        return min(capacity, tokens + (now - at) * capacity / self.window_s)

    def wait_s(self, name: str, capacity: int, now: float) -> float:
        """Seconds until `name` has a whole token (0 if it has one now)."""
        return max(0.0, (1.0 - self.tokens(name, capacity, now)) * self.window_s / capacity)

    def take(self, name: str, capacity: int, now: float) -> None:
        self._buckets[name] = (self.tokens(name, capacity, now) - 1.0, now)
        self._buckets.move_to_end(name)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)


class VoteLimits:
    """The two caps of docs/service.md, "Vote caps"; a cap of 0 is off."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        self.voter_cap = settings.vote_rate_limit
        self.key_quotas = settings.api_key_quotas()  # key -> its quota
        self.voters = TokenBuckets(settings.vote_rate_window_s)
        self.identities = TokenBuckets(settings.vote_rate_window_s)
        self.clock = clock
        self._lock = threading.Lock()

    def caller(self, secret: bytes, api_key: str | None, address: str, user: str | None) -> Caller:
        """The caller of a request sent with `api_key` (None when the server has no keys) from `address`,
        voting as `user` (None if it names none; ignored without keys)."""
        identity = identity_of(secret, api_key, address)
        if api_key is None:
            return Caller(identity, identity, self.voter_cap)
        return Caller(identity, f"{identity}/{user}" if user else identity, self.key_quotas[api_key])

    def admit(self, caller: Caller, *, withdrawal: bool = False) -> Refusal | None:
        """Count one vote (or, with `withdrawal`, one un-vote: the identity's quota only, since it adds
        no influence) against the caller's caps; a Refusal, counting nothing, when a cap is reached."""
        checks = [(self.identities, caller.identity, caller.quota, caller.identity.partition(":")[0])]
        if not withdrawal:
            checks.insert(0, (self.voters, caller.voter, self.voter_cap, "voter"))
        checks = [c for c in checks if c[2]]
        with self._lock:
            now = self.clock()
            for buckets, name, capacity, kind in checks:
                wait = buckets.wait_s(name, capacity, now)
                if wait > 0:
                    return Refusal(kind, capacity, max(1, math.ceil(wait)))
            for buckets, name, capacity, _ in checks:
                buckets.take(name, capacity, now)
        return None
