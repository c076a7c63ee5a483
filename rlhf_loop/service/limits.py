"""Influence caps at the API: how many votes one identity may cast per time window, per replica.

    limits = VoteLimits(settings); refusal = limits.admit(vote_identities(key, user, address))

A vote is counted against its *identity*: its `user`, scoped by the API key that sent it
(two apps' "alice" are two people), or, for a vote without a user, its API key (or the
client address when the server has no keys). With `vote_key_rate_limit` set, every vote
and withdrawal is also counted against its key (or address) as a whole, all its users
together: `user` is whatever the client says, so only that cap bounds a client that mints
users. Each cap is a token bucket (capacity = the limit, refilled at limit / window): a
burst of `limit` votes, then `limit` per window. A refused vote takes nothing from any
bucket, and the caller answers 429 with Retry-After before writing anything.

Memory is bounded: at most MAX_IDENTITIES buckets, the least recently used dropped first (a
dropped bucket comes back full, so a flood of fresh identities can free an old one early;
the key cap is what bounds that). The counts live in this process: N replicas allow N
times the cap (docs/service.md, "Vote caps").
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from rlhf_loop.core.contracts import Settings

MAX_IDENTITIES = 100_000  # ~100 bytes each


@dataclass(frozen=True)
class Identity:
    """Who a cap counts: `kind` is the metric label (never a user id: cardinality)."""

    kind: str  # "user", "key", "address"; "key_total", "address_total" for the per-key cap
    name: str


@dataclass(frozen=True)
class Refusal:
    kind: str  # the identity kind whose cap was reached
    limit: int  # that cap, per window
    retry_after_s: int  # whole seconds until one more is allowed


def key_fingerprint(api_key: str) -> str:
    """A key as a bucket name: the key itself is not kept in the limiter's memory."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def vote_identities(api_key: str | None, user: str | None, address: str) -> tuple[Identity, Identity]:
    """(the vote's own identity, its key's or address's whole) for a vote sent with `api_key`
    (None when the server has no keys) by `user` (None if the vote names none) from `address`."""
    source = Identity("key", key_fingerprint(api_key)) if api_key is not None else Identity("address", address)
    own = Identity("user", f"{source.name}/{user}" if api_key is not None else user) if user else source
    return own, Identity(f"{source.kind}_total", source.name)


class TokenBuckets:
    """One token bucket per identity, all with the same capacity and window; LRU-bounded."""

    def __init__(self, capacity: int, window_s: float, max_identities: int = MAX_IDENTITIES):
        self.capacity, self.rate = capacity, capacity / window_s  # tokens per second
        self.max_identities = max_identities
        self._buckets: OrderedDict[Identity, tuple[float, float]] = OrderedDict()  # -> (tokens, at)

    def tokens(self, who: Identity, now: float) -> float:
        tokens, at = self._buckets.get(who, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def wait_s(self, who: Identity, now: float) -> float:
        """Seconds until `who` has a whole token (0 if it has one now)."""
        return max(0.0, (1.0 - self.tokens(who, now)) / self.rate)

    def take(self, who: Identity, now: float) -> None:
        self._buckets[who] = (self.tokens(who, now) - 1.0, now)
        self._buckets.move_to_end(who)
        while len(self._buckets) > self.max_identities:
            self._buckets.popitem(last=False)


class VoteLimits:
    """The two caps of docs/service.md, "Vote caps"; a cap of 0 is off."""

    def __init__(self, settings: Settings, clock=time.monotonic):
        window = settings.vote_rate_window_s
        self.own = TokenBuckets(settings.vote_rate_limit, window) if settings.vote_rate_limit else None
        self.total = TokenBuckets(settings.vote_key_rate_limit, window) if settings.vote_key_rate_limit else None
        self.clock = clock
        self._lock = threading.Lock()

    def admit(self, identities: tuple[Identity, Identity], *, withdrawal: bool = False) -> Refusal | None:
        """Count one vote (or, with `withdrawal`, one un-vote: the key cap only, since it adds no
        influence) against its identities; a Refusal, counting nothing, when a cap is reached."""
        own, total = identities
        checks = [(b, who) for b, who in ((None if withdrawal else self.own, own), (self.total, total)) if b]
        with self._lock:
            now = self.clock()
            for buckets, who in checks:
                wait = buckets.wait_s(who, now)
                if wait > 0:
                    return Refusal(who.kind, buckets.capacity, max(1, math.ceil(wait)))
            for buckets, who in checks:
                buckets.take(who, now)
        return None
