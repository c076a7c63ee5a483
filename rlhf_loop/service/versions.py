"""Which policy version serves: load at start, follow announcements, verify, hot swap, pin.

    versions = VersionManager(settings, engine); versions.start(); loaded = versions.current

A replica loads LATEST from the policy store at start (version 0 is the base model), then
follows the policy-updates topic (a consumer with no group, assigned every partition, so
every replica sees every announcement) and re-reads LATEST every `policy_poll_s` as a
fallback for announcements missed while Kafka was away.

A version is verified (sha256 of every file against its manifest, and against the
announcement's own list when there is one) and loaded on a background thread, never on
the request path; then `current` is replaced with one reference assignment. A LoRA version
is an adapter over a full version, its base: the replica keeps each base in memory once
(`SharedBase`, while a loaded version runs on it) and loads each adapter version onto it (its
few MB read and verified here, injected by the engine between two steps, since forwards may
be running), so a swap costs an adapter, not a model; a version over another base loads that
base (a full reload). The base's own version runs on the same weights with the adapters off;
an adapter is deleted from the base when the last request of its version ends. A request
reads `current` once at its start and uses only that object, so requests in flight finish
on the version they started with, and a response names exactly one version. A version
that fails to verify or load is refused: the old one keeps serving, a metric and a log
line say why, and it is not retried (versions are immutable) unless an admin pins it. A model
the engine cannot batch (service/runner.py, `cannot_batch`: a cache with linear-attention or
other layers that are not full or sliding-window attention) is refused the same way, at load:
a replica with nothing else to serve is then never ready, and not alive.

Rules for moving: an announcement moves to its version only if that is newer than the one
serving (so a replayed old announcement is harmless), or if it is a rollback away from the
one serving (the trainer's live-approval watch, `rollback_of`); a change of LATEST is
followed whatever it says (that is how an operator moves LATEST back); a pin overrides all
of them until unpinned.

A request may also name a version (`model: rlhf-policy@v3`, service/api.py): `named(3)` gives it from
memory (serving, draining, or kept), else verifies and loads it as above, on the caller's thread (a chat
request's worker thread, never the event loop), and keeps the `named_versions_kept` versions named most
recently loaded (least recently named out first: its weights, or its adapter, go with the last request
on it). Loading one takes the same lock as a swap and does not touch `current`: the pin and the rules
above decide what the served name means, and a named version is never swapped in for it. A version that
failed its checks, now or before, is refused here too (never served), and one missing from the store is
unknown without being recorded as refused (a name asked for before its version is written is no refusal).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from rlhf_loop.core import lora
from rlhf_loop.core.broker import client_options, ensure_topics
from rlhf_loop.core.contracts import PolicyUpdate, Settings
from rlhf_loop.core.models import ensure_policy_store, load_causal_lm
from rlhf_loop.core.policy_store import MANIFEST, PolicyStore, VerificationError
from rlhf_loop.service import metrics
from rlhf_loop.service.engine import Engine
from rlhf_loop.service.loaded import LoadedVersion, SharedBase
from rlhf_loop.service.runner import cannot_batch

log = logging.getLogger(__name__)


class VersionRefused(Exception):
    """A version that will not be served; `reason` is the metric label."""

    def __init__(self, version: int, reason: str, detail: str):
        super().__init__(f"policy version {version} refused ({reason}): {detail}")
        self.version, self.reason, self.detail = version, reason, detail


class UnknownVersion(KeyError):
    """A version not in the store (for a named one: or, with named_versions_kept 0, not in memory)."""


def _put_adapter(base: SharedBase, name: str, config, weights: dict) -> None:
    """(engine thread) the adapter onto the base's weights; its PeftModel is made with the first one."""
    base.peft = lora.put_adapter(base.peft, base.model, name, config, weights)


class VersionManager:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine  # adapters go onto a base between the engine's steps
        self.store = PolicyStore(settings.policy_dir)
        # what is in memory, by version, while something uses it (weak: the last request on a version frees it):
        # full weights, which every version over them shares, and the last load of each version
        self._bases: weakref.WeakValueDictionary[int, SharedBase] = weakref.WeakValueDictionary()
        self._loaded: weakref.WeakValueDictionary[int, LoadedVersion] = weakref.WeakValueDictionary()
        self._named: OrderedDict[int, LoadedVersion] = OrderedDict()  # kept for requests naming them, oldest first
        self._current: LoadedVersion | None = None
        self._pinned: int | None = None
        self._last_latest: int | None = None  # LATEST as last seen by the poller
        self.refused: dict[int, str] = {}  # version -> why
        self._loads = 0  # adapter loads so far: each gets a name of its own
        self._lock = threading.Lock()  # current/pinned/named; never held while loading
        self._load_lock = threading.Lock()  # one load at a time, and the decision that goes with it
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name="policy-poll", daemon=True)]
        self.failed: str | None = None  # set when no version at all could be loaded at start

    @property
    def current(self) -> LoadedVersion | None:
        """The policy a new request should use (None until the first one is loaded)."""
        return self._current

    @property
    def pinned(self) -> int | None:
        return self._pinned

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=3)

    # -- admin

    def pin(self, version: int) -> LoadedVersion:
        """Serve `version` (loading and verifying it first) and ignore announcements and LATEST until unpinned."""
        with self._load_lock:
            if version not in self.store.versions():
                raise UnknownVersion(version)
            current = self._current
            loaded = current if current is not None and current.version == version else self._load_or_refuse(version)
            with self._lock:
                self._pinned = version
                self._swap(loaded)
            metrics.policy_pinned.set(1)
            log.warning("pinned policy version %d (announcements and LATEST ignored until unpinned)", version)
            return loaded

    def unpin(self) -> LoadedVersion | None:
        """Go back to following LATEST (loaded now, on the caller's thread)."""
        with self._lock:
            self._pinned = None
        metrics.policy_pinned.set(0)
        latest = self._last_latest = self.store.latest()
        if latest is not None:
            self.offer(latest, source="unpin")
        return self._current

    def status(self) -> dict:
        current = self._current
        loaded = self._in_memory()
        versions = []
        for info in self.store.info():
            v = info["version"]
            versions.append({**info, "serving": current is not None and current.version == v,
                             "loaded": v in loaded, "refused": self.refused.get(v)})
        return {"serving": None if current is None else current.version, "pinned": self._pinned,
                "latest": self.store.latest(), "versions": versions}

    # -- versions requests name

    def named(self, version: int) -> LoadedVersion:
        """`version` for a request that names it: from memory, else verified and loaded now (the caller waits:
        never call it on the event loop), and kept among the `named_versions_kept` named most recently.
        UnknownVersion if it is not in the store (or, with named_versions_kept 0, not in memory);
        VersionRefused if it fails its checks, now or before."""
        loaded = self.in_memory(version)
        if loaded is not None:
            return loaded
        if self.settings.named_versions_kept == 0 or version not in self.store.versions():
            raise UnknownVersion(version)
        with self._load_lock:
            loaded = self.in_memory(version)  # loaded meanwhile, for another request naming it
            if loaded is None:
                if version in self.refused:
                    raise VersionRefused(version, "refused", self.refused[version])
                loaded = self._load_or_refuse(version)
                metrics.policy_named_loads.inc()
                self._keep(loaded)
        return loaded

    def in_memory(self, version: int) -> LoadedVersion | None:
        """`version` if it is in memory (serving, draining, kept), kept as named just now; None if not. Never waits."""
        current = self._current
        loaded = current if current is not None and current.version == version else self._loaded.get(version)
        if loaded is not None:
            self._keep(loaded)
        return loaded

    def servable(self) -> list[dict]:
        """The versions a request may name, oldest first, as `PolicyStore.info` describes them: every one in the
        store not refused (loaded when named), or with named_versions_kept 0 the ones in memory."""
        refused, loaded, kept = set(self.refused), self._in_memory(), self.settings.named_versions_kept
        return [info for info in self.store.info()
                if "error" not in info and info["version"] not in refused and (kept > 0 or info["version"] in loaded)]

    def _in_memory(self) -> set[int]:
        current = self._current
        with self._lock:  # no load adds to _loaded while its keys are read
            loaded = set(self._loaded.keys())
        return loaded | (set() if current is None else {current.version})

    def _keep(self, loaded: LoadedVersion) -> None:
        """`loaded` named just now: kept, and the least recently named one beyond `named_versions_kept` let go."""
        with self._lock:
            self._named[loaded.version] = loaded
            self._named.move_to_end(loaded.version)
            while len(self._named) > self.settings.named_versions_kept:
                self._named.popitem(last=False)

    # -- moving between versions

    def offer(self, version: int, *, files: dict[str, str] | None = None, source: str) -> None:
        """Serve `version` unless pinned, already serving, refused before, or (announcements) not newer."""
        with self._load_lock:
            current = self._current
            if self._pinned is not None or version in self.refused:
                return
            if current is not None and (version == current.version or (source == "announcement" and version < current.version)):
                return  # (a rollback comes as source "rollback": it moves back on purpose)
            try:
                loaded = self._load_or_refuse(version, files)
            except VersionRefused:
                return
            with self._lock:
                if self._pinned is None:
                    self._swap(loaded)

    def _load_or_refuse(self, version: int, files: dict[str, str] | None = None) -> LoadedVersion:
        try:
            return self._load(version, files)
        except VersionRefused as e:
            self.refused[version] = f"{e.reason}: {e.detail}"
            metrics.policy_load_failures.labels(reason=e.reason).inc()
            current = self._current
            log.error("%s; still serving %s", e, "nothing" if current is None else current.fingerprint)
            raise

    def _load(self, version: int, files: dict[str, str] | None) -> LoadedVersion:
        started = time.monotonic()
        if version not in self.store.versions():
            raise VersionRefused(version, "missing", f"not in {self.store.versions_dir}")
        try:
            manifest = self.store.verify_files(version)
        except VerificationError as e:
            raise VersionRefused(version, "verify", str(e)) from e
        differ = sorted(n for n, h in (files or {}).items() if n != MANIFEST and manifest.files.get(n) != h)
        if differ:
            raise VersionRefused(version, "announcement_mismatch", f"announced sha256 of {differ} differ from the manifest")
        if manifest.base_version is None:
            base = self._full(version)
            loaded = LoadedVersion.of(version, base.model, base.tokenizer, base=base)
        else:
            base = self._full(manifest.base_version)
            if manifest.base_sha256 != base.manifest_sha256:
                raise VersionRefused(version, "verify", f"its base, version {manifest.base_version}, is not the one "
                                                       "it was trained on (manifest sha256 differs)")
            # a name of its own for every load: a version loaded again (a rollback, a pin) while an earlier
            # load of it still finishes its requests is another adapter, dropped with its own last request
            self._loads += 1
            name = f"v{version}_{self._loads}"
            try:
                config, weights = lora.read_adapter(self.store.path(version))
                self.engine.run_between_steps(lambda: _put_adapter(base, name, config, weights)).result(timeout=120)
            except Exception as e:  # a bad adapter refuses this version only
                raise VersionRefused(version, "load", f"{type(e).__name__}: {e}") from e
            loaded = LoadedVersion.of(version, base.model, base.tokenizer, base=base, adapter=name)
            weakref.finalize(loaded, self._drop_adapter, base, name)  # the last request of it ended: free it
        with self._lock:
            self._loaded[version] = loaded
        log.info("loaded policy version %d (%s, %s, %.2fs)", version, "full weights" if manifest.base_version is None
                 else f"adapter over v{manifest.base_version}", str(base.model.dtype).removeprefix("torch."),
                 time.monotonic() - started)
        return loaded

    def _full(self, version: int) -> SharedBase:
        """The full-weight version `version` in memory: the one already there, or verified and loaded."""
        base = self._bases.get(version)
        if base is not None:
            return base
        try:
            self.store.verify_files(version)
        except VerificationError as e:
            raise VersionRefused(version, "verify", str(e)) from e
        try:
            model, tokenizer = load_causal_lm(self.store.path(version), self.settings)
        except Exception as e:  # any loader failure (bad config, unsupported arch, OOM) refuses this version only
            raise VersionRefused(version, "load", f"{type(e).__name__}: {e}") from e
        unsupported = cannot_batch(model.config)
        if unsupported is not None:  # refused here, before it serves, not by a 500 on every request
            raise VersionRefused(version, "unsupported", unsupported)
        base = self._bases[version] = SharedBase(version, model, tokenizer, self.store.manifest_sha256(version))
        return base

    def _drop_adapter(self, base: SharedBase, name: str) -> None:
        """(weakref.finalize, any thread) delete an adapter no loaded version uses any more, between engine steps."""
        self.engine.run_between_steps(lambda: lora.drop_adapter(base.peft, name))

    def _swap(self, loaded: LoadedVersion) -> None:
        old = self._current
        if old is loaded:
            return
        self._current = loaded
        metrics.policy_version.set(loaded.version)
        metrics.policy_swaps.inc()
        log.info("now serving %s (was %s)", loaded.fingerprint, "nothing" if old is None else old.fingerprint)

    # -- background threads

    def _run(self) -> None:
        """Initial load, then start following announcements, then poll LATEST."""
        try:
            store = ensure_policy_store(self.settings)
        except Exception as e:  # e.g. an unwritable store: /livez fails and the replica is restarted
            self.failed = f"policy store {self.settings.policy_dir} unusable: {type(e).__name__}: {e}"
            log.exception(self.failed)
            return
        latest = self._last_latest = store.latest()
        for v in [latest, *sorted((v for v in store.versions() if v < latest), reverse=True)]:
            try:
                loaded = self._load_or_refuse(v)
            except VersionRefused:
                continue  # LATEST does not verify: fall back to the newest one that does
            with self._lock:
                if self._current is None:
                    self._swap(loaded)
            break
        else:
            self.failed = f"no policy version in {store.root} verifies and loads: {self.refused}"
            log.critical(self.failed)
            return
        follower = threading.Thread(target=self._follow, name="policy-follow", daemon=True)
        self._threads.append(follower)
        follower.start()
        while not self._stop.wait(self.settings.policy_poll_s):
            try:
                latest = self.store.latest()
            except (OSError, ValueError) as e:
                log.warning("cannot read LATEST: %s", e)
                continue
            if latest is not None and latest != self._last_latest:
                self._last_latest = latest
                self.offer(latest, source="poll")

    def _follow(self) -> None:
        topic = self.settings.topic_policy_updates
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(
                    **client_options(self.settings),
                    client_id="rlhf-service-policy-follower", group_id=None, enable_auto_commit=False,
                    auto_offset_reset="latest", request_timeout_ms=10000,
                    bootstrap_timeout_ms=5000, reconnect_backoff_max_ms=1000,
                )
                if self.settings.create_topics:
                    ensure_topics(self.settings, timeout=5)
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    raise KafkaError(f"topic {topic} does not exist")
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                consumer.seek_to_end(*tps)
                for tp in tps:
                    consumer.position(tp)  # resolve "the end" now: announcements from here on are seen
                attached = time.time()
                metrics.policy_following.set(1)
                log.info("following %s (%d partitions)", topic, len(tps))
                while not self._stop.is_set():
                    for records in consumer.poll(timeout_ms=500).values():
                        for record in records:
                            self._on_announcement(record.value, attached)
            except KafkaError as e:
                log.warning("policy-updates follower: %s: %s; retrying (LATEST is still polled)", type(e).__name__, e)
            finally:
                metrics.policy_following.set(0)
                if consumer is not None:
                    consumer.close()
            self._stop.wait(2.0)

    def _on_announcement(self, value: bytes, attached: float) -> None:
        try:
            update = PolicyUpdate.model_validate_json(value)
        except ValidationError as e:
            log.warning("ignoring a malformed policy announcement: %s", e)
            return
        if update.ts.timestamp() < attached:
            # a replay from before we attached (a broker whose "end" offset is off, as the embedded
            # one's is): LATEST, read at start and polled, already speaks for that time
            log.info("ignoring policy version %d announced before this replica followed the topic", update.version)
            return
        current = self._current
        if update.rollback_of is not None:
            log.warning("announced: rollback of policy version %d to %d", update.rollback_of, update.version)
            if current is not None and current.version == update.rollback_of:
                self.offer(update.version, files=update.files, source="rollback")
                metrics.policy_rollbacks.inc()
        else:
            log.info("announced: policy version %d (parent %s)", update.version, update.parent_version)
            self.offer(update.version, files=update.files, source="announcement")
        metrics.policy_announcements.inc()  # after acting on it: "counted" means "decided"
