"""The loop page at /loop, in a real headless browser, against two real `bentoml serve` replicas and
the trainer's real GET /loop server.

    .venv/bin/python -m pytest -q tests/service/test_loop_page.py

The trainer's side is its own code on a trainer dir made here: rounds appended to rounds.jsonl as
a round appends them (trainer/round.py, append_round), votes in a real label store, served by
trainer/metrics.py's server. Two replicas share one policy store (as in Kubernetes); the page,
served by the first, shows what both serve, the rounds with their verdicts and reasons, KL to the
reference and approval by version, and pins / unpins the first through its admin API (another
port: a cross-origin call from the page). The screenshot it takes is docs/img/loop.png.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from service_helpers import API_KEY, css, wait_until, write_version

from rlhf_loop.core.broker import free_port
from rlhf_loop.core.contracts import Feedback, Interaction, Message, Sampling
from rlhf_loop.trainer import metrics
from rlhf_loop.trainer.round import RoundReport, append_round
from rlhf_loop.trainer.store import LabelStore

ADMIN_KEY = "admin-test-key"
T0 = time.time() - 3600
# (round, verdict, version published, KL of the candidate, reason): what the page must show
ROUNDS = [
    (1, "promoted", 1, 0.12, "reward 0.100 -> 0.300, KL 0.12 < 0.5, length 9.0 vs 9.5"),
    (2, "rejected", None, 0.71, "KL to the reference 0.71 > 0.5"),
    (3, "skipped", None, None, "no labelled examples yet"),
]
# policy version -> votes (1 up, -1 down) on its answers, oldest first
VOTES = {0: [1, -1, -1, 1, -1], 1: [1, 1, -1, 1]}


def answer(rid: str, version: int) -> Interaction:
    return Interaction(response_id=rid, policy_version=version, model="m",
                       messages=[Message(role="user", content="Tell me about cats.")], prompt_token_ids=[1, 2],
                       completion="Cats!", completion_token_ids=[3], finish_reason="stop",
                       sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=8))


def make_trainer_dir(root) -> None:
    for n, verdict, version, kl, reason in ROUNDS:
        candidate = {} if kl is None else {"reward": 0.1 + 0.2 * n, "kl_to_ref": kl}
        append_round(root / "rounds.jsonl", RoundReport(
            round=n, trigger_time=T0 + 600 * n, kl_bound=0.5, labels=9, candidate=candidate,
            current={} if kl is None else {"reward": 0.1, "kl_to_ref": 0.05 * n}, version_before=1 if n > 1 else 0,
            version=version, promoted=verdict == "promoted", reason=reason))
    store = LabelStore(root / "labels.sqlite", late_vote_window_s=1e9, dedupe_window_s=1e9, prompt_pool_size=10)
    try:
        events: list = []
        for version, ratings in VOTES.items():
            for i, rating in enumerate(ratings):
                rid = f"r{version}-{i}"
                ts = datetime.fromtimestamp(T0 + 900 * version + 60 * i, timezone.utc)
                events += [answer(rid, version), Feedback(feedback_id=f"f-{rid}", response_id=rid, rating=rating, ts=ts)]
        store.apply_batch(events, {})
    finally:
        store.close()


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("trainer")
    make_trainer_dir(root)
    port = free_port()
    metrics.serve("127.0.0.1", port, root / "rounds.jsonl", root / "labels.sqlite")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def replicas(start_service, module_broker, trainer_url):
    """Two replicas on one policy store; the first has the admin key and the trainer, the second a trainer
    address where nothing listens."""
    first = start_service(module_broker.bootstrap, trainer_url=trainer_url, admin_key=ADMIN_KEY)
    second = start_service(module_broker.bootstrap, policy_store=str(first.state_dir / "policies"),
                           trainer_url=f"http://127.0.0.1:{free_port()}")
    return first, second


def rows(driver, table: str) -> list[list[str]]:
    """The table's cells as shown now, read in one script: the page re-renders its tables on a timer, so
    elements found one by one can be replaced in between (a stale element)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), "
        "tr => Array.from(tr.querySelectorAll('td'), td => td.innerText.trim()))", f"#{table} tbody tr")


def replica_rows(driver) -> dict[str, tuple[str, str]]:
    """replica name -> (serves, pinned) as the page shows them."""
    return {r[0].removesuffix(" (answered this page)"): (r[1], r[2]) for r in rows(driver, "replicas")}


def loop_json(svc) -> dict:
    resp = httpx.get(f"{svc.url}/v1/loop", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_v1_loop_without_a_trainer_shows_the_replicas_and_says_why(replicas):
    first, second = replicas
    assert httpx.get(f"{second.url}/v1/loop", timeout=30).status_code == 401, "the public API's key rules"
    view = wait_until(lambda: len((v := loop_json(second))["replicas"]) == 2 and v, 60,
                      "both replicas on the board")
    assert view["trainer"]["status"] == "unreachable" and "ConnectError" in view["trainer"]["detail"]
    assert view["rounds"] == [] and view["approval"] == []
    answering = [r for r in view["replicas"] if r["answering"]]
    assert len(answering) == 1 and answering[0]["name"].endswith(second.url.rpartition(":")[2])


def test_the_loop_page_shows_the_loop_and_pins_a_replica(browser, replicas, tmp_path):
    first, second = replicas
    store = first.state_dir / "policies"
    assert write_version(store, seed=3) == 1  # LATEST -> v1: both replicas follow it (policy_poll_s)
    for svc in replicas:
        wait_until(lambda: svc.metric("rlhf_policy_version") == 1, 60, "a replica to swap in v1")
    names = [r["name"] for r in loop_json(first)["replicas"]]
    assert len(names) == 2

    browser.get(f"{first.url}/loop?admin={first.admin_url}")
    WebDriverWait(browser, 30).until(lambda d: css(d, "#key-box").is_displayed())  # keys on: 401 until one is given
    css(browser, "#api-key").send_keys(API_KEY, Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: replica_rows(d) == {n: ("v1", "\u2013") for n in names})

    # the rounds, newest first, with their verdicts and reasons
    shown = rows(browser, "rounds")
    assert [r[0] for r in shown] == ["3", "2", "1"]
    assert [r[4] for r in shown] == ["skipped", "rejected", "promoted v1"]
    assert [r[5] for r in shown] == [reason for *_, reason in reversed(ROUNDS)]
    assert shown[1][6] == "0.710 / 0.50" and shown[2][7] == "0.100 \u2192 0.300"
    # KL to the reference: one point per judged round, by verdict, and the bound
    points = browser.find_elements(By.CSS_SELECTOR, "#kl-chart .kl-point")
    assert [(p.get_attribute("data-round"), p.get_attribute("class")) for p in points] == [
        ("1", "kl-point promoted"), ("2", "kl-point rejected")]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#kl-chart .kl-bound")) == 1
    ys = [float(p.get_attribute("cy")) for p in points]
    assert ys[1] < ys[0], "the rejected candidate's larger KL is drawn higher"
    # approval by version: a line each, the legend with the store's counts
    lines = browser.find_elements(By.CSS_SELECTOR, "#approval-chart .approval-line")
    assert [line.get_attribute("data-version") for line in lines] == ["0", "1"]
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#approval-legend .approval-item")]
    assert legend == ["v0 40% (2/5)", "v1 75% (3/4)"]
    assert len(lines[0].get_attribute("points").split()) >= 2, "v0's approval over time, not one dot"

    # pin / unpin: switched off until the admin key is given
    WebDriverWait(browser, 30).until(lambda d: "admin key" in css(d, "#admin-state").text)
    assert all(not b.is_enabled() for b in browser.find_elements(By.CSS_SELECTOR, "#versions .pin"))
    assert not css(browser, "#unpin").is_enabled()
    css(browser, "#admin-key").send_keys(ADMIN_KEY, Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: [r[0] for r in rows(d, "versions")] == ["v1", "v0"])
    css(browser, "#versions tr[data-version='0'] .pin").click()
    WebDriverWait(browser, 120).until(lambda d: css(d, "#admin-state").text == "pinned v0")
    admin = httpx.get(f"{first.admin_url}/admin/versions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=30).json()
    assert (admin["pinned"], admin["serving"]) == (0, 0)
    mine = next(n for n in names if n.endswith(":" + first.url.rpartition(":")[2]))
    other = next(n for n in names if n != mine)
    WebDriverWait(browser, 60).until(lambda d: replica_rows(d) == {mine: ("v0", "v0"), other: ("v1", "\u2013")})
    assert css(browser, "#unpin").is_enabled()

    browser.set_window_size(1200, 1000)  # the whole page in the screenshot
    shot = tmp_path / "loop.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    css(browser, "#unpin").click()
    WebDriverWait(browser, 120).until(lambda d: css(d, "#admin-state").text == "unpinned: following LATEST")
    WebDriverWait(browser, 60).until(lambda d: replica_rows(d) == {mine: ("v1", "\u2013"), other: ("v1", "\u2013")})
    assert not css(browser, "#unpin").is_enabled()


def test_wrong_admin_key_is_refused_on_the_page(browser, replicas):
    first, _ = replicas
    browser.get(f"{first.url}/loop?admin={first.admin_url}")
    key = css(browser, "#admin-key")
    key.clear()
    key.send_keys("not-the-admin-key", Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: css(d, "#admin-state").text.startswith("admin API: "))
    assert "may not use the admin API" in css(browser, "#admin-state").text


def test_loop_page_loads_nothing_from_outside(replicas):
    html = httpx.get(f"{replicas[0].url}/loop").text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert refs == ["/", "/docs"], "one self-contained page: no CDN, no other host"
    assert re.findall(r"\w+://[^\s\"']*", html) == ["http://www.w3.org/2000/svg"], "only SVG's namespace name"
