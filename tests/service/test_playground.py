"""The chat playground at `/`, in a real headless browser against a real `bentoml serve`.

    .venv/bin/python -m pytest -q tests/service/test_playground.py

Debian's chromium and chromium-driver (`make test` installs them) driven by selenium:
type the API key, send a message, watch the answer stream in, vote up, change the vote,
withdraw it (each read back from Kafka), then see the version change when a new policy is
swapped in. Compare mode: two answers to one message (n=2) side by side, a preference between
them (arrow keys or buttons) sent to /v1/preferences. The screenshots they take are
docs/img/playground.png and docs/img/compare.png.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from service_helpers import API_KEY, announce, css, read_events, wait_until, write_version

from rlhf_loop.core.contracts import Feedback, Interaction, Preference

# Records every text the newest answer showed, so that the test sees it grow (streaming) rather
# than only its final state.
WATCH_STREAM = """
window.seen = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll(".answer > span");
  if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById("transcript"), {childList: true, subtree: true, characterData: true});
"""

# Records each request the page sends to /v1/preferences and the answer it gets.
WATCH_PREFERENCES = """
window.preferences = [];
const original = window.fetch;
window.fetch = async (url, options) => {
  const response = await original(url, options);
  if (String(url).startsWith("/v1/preferences")) {
    window.preferences.push({url: String(url), method: options.method, body: options.body ? JSON.parse(options.body) : null,
                             status: response.status, answer: await response.clone().json()});
  }
  return response;
};
"""


def ask(driver, text: str, answers_before: int):
    """Type a message, press Enter, return the new answer element once its vote buttons are there."""
    css(driver, "#message").send_keys(text, Keys.ENTER)
    return WebDriverWait(driver, 120).until(
        lambda d: (a := d.find_elements(By.CSS_SELECTOR, ".answer[data-response-id]"))[answers_before:] and a[-1])


def vote_events(bootstrap: str, response_id: str, count: int) -> list[Feedback]:
    events = read_events(bootstrap, ["rlhf.feedback"],
                         until=lambda ev: len(votes_on(ev, response_id)) >= count)
    return votes_on(events, response_id)


def votes_on(events: list, response_id: str) -> list[Feedback]:
    """The votes among `events` (the feedback topic carries preferences too) on `response_id`."""
    return [e for e in events if isinstance(e, Feedback) and e.response_id == response_id]


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
    # an answer may start with a space (the model's first token), which the rendered text keeps
    assert text.strip() and all(text.strip().startswith(s.strip()) for s in seen)
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


def open_page(driver, url: str) -> None:
    """The playground, with the API key given (the key box shows while the server answers 401)."""
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: css(d, "#key-box").is_displayed())
    key = css(driver, "#api-key")
    key.clear()
    key.send_keys(API_KEY, Keys.TAB)


def compare(driver, text: str) -> tuple:
    """Ask in compare mode; (the pair, its left answer, its right answer) once both have their ids."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".pair"))
    css(driver, "#message").send_keys(text, Keys.ENTER)
    pair = WebDriverWait(driver, 120).until(lambda d: (p := d.find_elements(By.CSS_SELECTOR, ".pair"))[before:] and p[-1])
    WebDriverWait(driver, 120).until(lambda d: len(pair.find_elements(By.CSS_SELECTOR, ".answer[data-response-id]")) == 2)
    return (pair, *pair.find_elements(By.CSS_SELECTOR, ".answer"))


def shown_text(driver, answer) -> str:
    return driver.execute_script("return arguments[0].querySelector('.text').textContent", answer)


def test_compare_mode_shows_two_answers_to_one_prompt_side_by_side(browser, service, module_broker, tmp_path):
    open_page(browser, f"{service.url}/")
    css(browser, "#compare").click()
    pair, left, right = compare(browser, "Tell me about dogs.")
    rid = left.get_attribute("data-response-id")
    assert rid.startswith("chatcmpl-") and right.get_attribute("data-response-id") == rid, "one n=2 response"
    assert [(a.get_attribute("data-side"), a.get_attribute("data-choice-index")) for a in (left, right)] == [
        ("left", "0"), ("right", "1")]
    assert left.location["y"] == right.location["y"] and left.location["x"] < right.location["x"], "side by side"
    texts = [shown_text(browser, a) for a in (left, right)]
    events = read_events(module_broker.bootstrap, ["rlhf.interactions"],
                         until=lambda ev: sum(e.response_id == rid for e in ev) == 2)
    logged = sorted((e for e in events if isinstance(e, Interaction) and e.response_id == rid),
                    key=lambda e: e.choice_index)
    assert [e.completion for e in logged] == texts and all(texts), "each side shows its choice, whole"
    assert all(e.messages[-1].content == "Tell me about dogs." for e in logged)
    assert pair.find_element(By.CSS_SELECTOR, ".prefer-left").is_enabled()
    shot = tmp_path / "compare.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_mode_sends_the_preference_the_keys_and_buttons_choose(browser, service, module_broker):
    open_page(browser, f"{service.url}/")
    if not css(browser, "#compare").is_selected():
        css(browser, "#compare").click()
    pair, left, _ = compare(browser, "Do you like rain?")
    rid = left.get_attribute("data-response-id")
    browser.execute_script(WATCH_PREFERENCES)
    css(browser, "body").send_keys(Keys.ARROW_RIGHT)  # the shortcut: the right answer is better
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return window.preferences.length") == 1)
    (sent,) = browser.execute_script("return window.preferences")
    user = sent["body"].pop("user")
    assert (sent["url"], sent["method"]) == ("/v1/preferences", "POST") and user.startswith("playground-")
    assert sent["body"] == {"chosen": {"response_id": rid, "choice_index": 1},
                            "rejected": {"response_id": rid, "choice_index": 0}, "tie": False}
    assert sent["status"] == 202, sent
    answer = sent["answer"]
    assert answer["object"] == "preference" and answer["chosen"] == sent["body"]["chosen"] and not answer["deleted"]
    state = pair.find_element(By.CSS_SELECTOR, ".pref-state")
    WebDriverWait(browser, 30).until(lambda d: state.text == "preferred right")
    assert pair.get_attribute("data-preference-id") == answer["id"]
    assert "chosen" in pair.find_element(By.CSS_SELECTOR, ".prefer-right").get_attribute("class")

    pair.find_element(By.CSS_SELECTOR, ".prefer-tie").click()
    WebDriverWait(browser, 30).until(lambda d: state.text == "tie recorded")
    tie = browser.execute_script("return window.preferences")[1]
    assert tie["body"]["tie"] is True and tie["status"] == 202 and tie["answer"]["tie"] is True
    pair.find_element(By.CSS_SELECTOR, ".withdraw").click()
    WebDriverWait(browser, 30).until(lambda d: state.text == "preference withdrawn")
    withdrawn = browser.execute_script("return window.preferences")[2]
    assert (withdrawn["method"], withdrawn["status"], withdrawn["answer"]["deleted"]) == ("DELETE", 202, True)
    assert unquote(withdrawn["url"]) == "/v1/preferences/" + answer["id"]
    # the same voter's preferences on one pair are one (the tie replaced the first); a withdrawal names no pair
    assert tie["answer"]["id"] == answer["id"]
    assert (withdrawn["answer"]["chosen"], withdrawn["answer"]["rejected"]) == (None, None)
    assert not any("chosen" in pair.find_element(By.CSS_SELECTOR, c).get_attribute("class")
                   for c in (".prefer-left", ".prefer-right", ".prefer-tie"))
    assert not pair.find_element(By.CSS_SELECTOR, ".withdraw").is_enabled()
    # each on Kafka, in order, under the one id: right over left, the tie, the withdrawal
    events = read_events(module_broker.bootstrap, ["rlhf.feedback"],
                         until=lambda ev: sum(isinstance(e, Preference) and e.preference_id == answer["id"]
                                              for e in ev) == 3)
    stated = [e for e in events if isinstance(e, Preference) and e.preference_id == answer["id"]]
    assert [(e.chosen and e.chosen.choice_index, e.tie, e.deleted) for e in stated] == [
        (1, False, False), (0, True, False), (None, False, True)]


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
