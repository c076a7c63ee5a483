"""Running a real service process for tests, and reading what it wrote to Kafka and /metrics."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from rlhf_loop.core.broker import free_port
from rlhf_loop.core.contracts import AnyEvent
from rlhf_loop.service import serve

API_KEY = "sk-test-key"
MODEL = "rlhf-policy"
EVENTS = TypeAdapter(AnyEvent)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """The predicate's first truthy value; fails the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ServiceProcess:
    """A real `rlhf serve` (bentoml serve) subprocess in its own process group."""

    url: str
    admin_url: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen
    env: dict[str, str]

    @classmethod
    def start(cls, state_dir: Path, model_dir: str, bootstrap: str, **settings: str) -> "ServiceProcess":
        port, admin_port = free_port(), free_port()
        state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "BENTOML_HOME"))}
        env.update({
            "RLHF_STATE_DIR": str(state_dir), "RLHF_MODEL": model_dir, "RLHF_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "RLHF_API_KEYS": API_KEY, "RLHF_ADMIN_PORT": str(admin_port), "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **{f"RLHF_{k.upper()}": v for k, v in settings.items()},
        })
        log_path = state_dir / "service.log"
        with open(log_path, "ab") as log:
            proc = serve.spawn("127.0.0.1", port, env, log)
        svc = cls(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", state_dir, log_path, proc, env)
        try:
            serve.wait_ready(svc.url, proc, timeout=300)  # a 135M model on a busy 2-core machine takes minutes
        except BaseException as e:
            svc.stop()
            raise RuntimeError(f"the service did not come up:\n{svc.log_tail()}") from e
        return svc

    def stop(self) -> None:
        serve.terminate(self.proc)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # -- clients

    def openai(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def id_secret(self) -> bytes:
        return (self.state_dir / "response_id_secret").read_text().strip().encode()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))

    def wait_drained(self, timeout: float = 60) -> None:
        wait_until(lambda: self.metric("rlhf_spool_depth") == 0, timeout, "the event spool to drain to Kafka")


def read_events(bootstrap: str, topics: list[str], until: Callable[[list], bool], timeout: float = 60) -> list:
    """Every event on `topics` from the beginning, in partition order, once `until(events)` holds.

    Events are parsed with the shared schemas (core.contracts), so a malformed one fails here.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + timeout

        def partitions() -> list[TopicPartition] | None:
            """Every partition of `topics`; None until all exist (the producer under test creates
            them when it connects, which may be after this reader starts)."""
            found = [[TopicPartition(t, p) for p in sorted(consumer.partitions_for_topic(t) or [])] for t in topics]
            return [tp for tps in found for tp in tps] if all(found) else None

        tps = wait_until(partitions, timeout, f"topics {topics} to exist")
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        events: list = []
        while True:
            for records in consumer.poll(timeout_ms=300).values():
                events.extend(EVENTS.validate_json(r.value) for r in records)
            if until(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(events)} events on {topics} after {timeout:.0f}s; expected more")
    finally:
        consumer.close()


def chat(client: openai.OpenAI, content: str = "Tell me about cats.", **kw):
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def write_version(store_root: Path, *, seed: int, noise: float = 0.05, corrupt: bool = False) -> int:
    """Write the next policy version: the base model (v0) with every weight matrix perturbed by
    `noise` times its own std, then move LATEST to it. `corrupt` flips bytes in the weights after
    the manifest was written (before LATEST moves), so its hashes no longer match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_loop.core.policy_store import PolicyStore

    store = PolicyStore(store_root)
    version = max(store.versions()) + 1
    base = store.path(0)

    def save(d: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
        model.save_pretrained(d, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(d)

    store.write(version, save, parent_version=version - 1, set_latest=False)
    if corrupt:
        weights = store.path(version) / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-100:-90] = bytes(10)
        weights.write_bytes(bytes(data))
    store.set_latest(version)
    return version


def write_adapter_version(store_root: Path, *, seed: int, base: int = 0, noise: float = 0.5) -> int:
    """Write the next policy version as a LoRA adapter over `base` (as the trainer would: core/lora.py's files,
    the manifest naming its base), its B weights of std `noise` (0.5 changes the embedded model's answers),
    and move LATEST to it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_loop.core import lora
    from rlhf_loop.core.policy_store import PolicyStore

    store = PolicyStore(store_root)
    version = max(store.versions()) + 1
    model = AutoModelForCausalLM.from_pretrained(store.path(base), use_safetensors=True)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="new")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero (an adapter that changes nothing)
                p.copy_(torch.randn(p.shape, generator=g) * noise)
    weights = lora.saved_names(dict(peft.named_parameters()), "new")
    store.write(version, lambda d: lora.write_adapter(d, peft.peft_config["new"], weights), parent_version=base,
                base_version=base, set_latest=False)
    store.set_latest(version)
    return version


def announce(bootstrap: str, store_root: Path, version: int, topic: str = "rlhf.policy-updates") -> None:
    """Send the PolicyUpdate a trainer would send for `version` (files = its manifest's hashes)."""
    from kafka import KafkaProducer

    from rlhf_loop.core.contracts import PolicyUpdate
    from rlhf_loop.core.policy_store import PolicyStore

    store = PolicyStore(store_root)
    manifest = store.manifest(version)
    update = PolicyUpdate(version=version, parent_version=manifest.parent_version or 0,
                          uri=str(store.path(version)), files=manifest.files)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, key=str(version).encode(), value=update.to_bytes()).get(timeout=30)
    finally:
        producer.close()


def css(driver, selector: str):
    """The page's element at `selector` (selenium)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)
