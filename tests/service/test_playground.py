"""The chat playground at `/`, in a real headless browser against a real `bentoml serve`.

    .venv/bin/python -m pytest -q tests/service/test_playground.py

Debian's chromium and chromium-driver (`make test` installs them) driven by selenium:
type the API key, send a message, watch the answer stream in, vote up, change the vote,
withdraw it (each read back from Kafka), then see the version change when a new policy is
swapped in. The screenshot it takes is docs/img/playground.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as ChromeDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from service_helpers import API_KEY, announce, read_events, wait_until, write_version

from rlhf_loop.core.contracts import Feedback

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless on a machine with no display, GPU or outside network: without the networking flags
# chromium keeps dialling Google's services, each a refused connection on a closed network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,640")
# Records every text the newest answer showed, so that the test sees it grow (streaming) rather
# than only its final state.
WATCH_STREAM = """
window.seen = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll(".answer > span");
  if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById("transcript"), {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make test` installs Debian's chromium and "
                    "chromium-driver (apt-get; no browser can be downloaded here)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeDriver(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def ask(driver, text: str, answers_before: int):
    """Type a message, press Enter, return the new answer element once its vote buttons are there."""
    css(driver, "#message").send_keys(text, Keys.ENTER)
    return WebDriverWait(driver, 120).until(
        lambda d: (a := d.find_elements(By.CSS_SELECTOR, ".answer[data-response-id]"))[answers_before:] and a[-1])


def vote_events(bootstrap: str, response_id: str, count: int) -> list[Feedback]:
    events = read_events(bootstrap, ["rlhf.feedback"],
                         until=lambda ev: sum(e.response_id == response_id for e in ev) >= count)
    return [e for e in events if e.response_id == response_id]


def click_and_wait(driver, answer, button: str, state: str) -> None:
    answer.find_element(By.CSS_SELECTOR, button).click()
    WebDriverWait(driver, 30).until(lambda d: answer.find_element(By.CSS_SELECTOR, ".vote-state").text == state)


def test_chat_vote_change_withdraw_and_see_a_new_policy(browser, service, module_broker, tmp_path):
    browser.get(f"{service.url}/")
    # API keys are on: the page asks for one before it can list the model
    key_box = css(browser, "#key-box")
    WebDriverWait(browser, 30).until(lambda d: key_box.is_displayed())
    css(browser, "#api-key").send_keys(API_KEY, Keys.TAB)

    browser.execute_script(WATCH_STREAM)
    answer = ask(browser, "Tell me about cats.", 0)
    text = answer.find_element(By.CSS_SELECTOR, "span").text
    seen = [s for s in browser.execute_script("return window.seen") if s]
    assert text and all(text.startswith(s.strip()) for s in seen)
    assert len(set(seen)) >= 3, f"the answer should appear piece by piece as it streams, saw {seen}"
    rid = answer.get_attribute("data-response-id")
    assert rid.startswith("chatcmpl-") and answer.get_attribute("data-version") == "v0"
    assert css(browser, "#serving").text == "v0"

    click_and_wait(browser, answer, ".vote-up", "voted up")
    (up,) = vote_events(module_broker.bootstrap, rid, 1)
    assert up.rating == 1 and up.user.startswith("playground-") and not up.deleted
    click_and_wait(browser, answer, ".vote-down", "voted down")
    click_and_wait(browser, answer, ".withdraw", "vote withdrawn")
    _, down, withdrawn = vote_events(module_broker.bootstrap, rid, 3)
    assert down.rating == -1 and down.feedback_id == up.feedback_id, "a changed vote replaces the first"
    assert withdrawn.deleted and withdrawn.rating is None and withdrawn.feedback_id == up.feedback_id

    # a new policy is published and announced, as the trainer would; the next answer comes from it
    store = service.state_dir / "policies"
    announce(module_broker.bootstrap, store, write_version(store, seed=3))
    wait_until(lambda: service.metric("rlhf_policy_version") == 1, 60, "the service to swap in v1")
    second = ask(browser, "Do you like rain?", 1)
    assert second.get_attribute("data-version") == "v1" and css(browser, "#serving").text == "v1"
    assert "v0 \u2192 v1" in css(browser, ".notice").text
    click_and_wait(browser, second, ".vote-up", "voted up")

    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_loads_nothing_from_outside(service):
    html = httpx.get(f"{service.url}/").text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert refs == ["/docs"] and "://" not in html, "one self-contained page: no CDN, no other host"


def test_docs_page_renders_every_operation(browser, service):
    """/docs: Swagger UI from BentoML's bundled assets, rendering /openapi.json."""
    browser.get(f"{service.url}/docs")
    operations = WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {op.get_attribute("data-path") for op in operations}
    assert {"/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/v1/feedback", "/v1/feedback/{feedback_id}",
            "/livez", "/readyz", "/metrics"} <= paths, paths
