"""The viewer in a real headless Chromium against a proxy holding recorded trajectories.

The trajectories are recorded through the fake upstream's ``render`` mode (tests/conversations.py), so
their prefixes extend or break as a real agent's would. Screenshots are saved (see tests/browser.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import create_engine, text

from tests.browser import LAPTOP, chromium, screenshot_dir, shoot
from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream, fake_logprob, token_piece
from tests.servers import serve_in_thread

pytestmark = pytest.mark.browser

KEY = "viewer-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOOL_HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "18 C, clear"},
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A proxy with an API key holding: agent-ok (one sequence, rewarded, finished), agent-broken (a
    prefix break at call 2), agent-failed (an upstream 500 at call 1), agent-tools (a tool call),
    agent-edit (for the reward and tag forms)."""
    upstream = FakeUpstream()
    with (
        serve_in_thread(upstream) as upstream_url,
        running_proxy(upstream_url, tmp_path_factory.mktemp("viewer"), api_key=KEY) as proxy,
    ):
        record_conversation(
            proxy.url, "agent-ok", ["add 2 and 3", "now times 4", "thanks"], tags="env=test,group=g1"
        )
        record_conversation(proxy.url, "agent-broken", ["a", "b", "c", "d"], break_at=2, tags="env=test")
        record_conversation(proxy.url, "agent-failed", ["x", "y", "z"], fail_at=1, tags="env=prod")
        body = {"model": "tiny", "messages": TOOL_HISTORY, "max_tokens": 12}
        headers = {
            "X-Trajectory-Id": "agent-tools",
            "x-fake": "sample:06a_tools_required_nonstrict_nonstream",
        }
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        record_conversation(proxy.url, "agent-edit", ["q"])
        proxy.wait_all_records()
        api = proxy.url + "/tokentrail/v1/trajectories"
        assert httpx.post(api + "/agent-ok/reward", json={"reward": 1.0}, headers=AUTH).status_code == 200
        assert httpx.post(api + "/agent-ok/finish", headers=AUTH).status_code == 200
        yield proxy


def _page(browser: Browser, proxy: Proxy, hash_part: str = "") -> Page:
    """A laptop-sized page that has typed the key once (kept in sessionStorage)."""
    page = browser.new_page(viewport=LAPTOP)
    page.goto(proxy.url + "/tokentrail/ui/" + hash_part)
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    return page


def _listed(page: Page) -> list[str]:
    expect(page.locator("main[data-ready=list]")).to_be_attached()
    return page.locator("tbody th[scope=row]").all_inner_texts()


def _filter(page: Page, **values: str) -> list[str]:
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("main[data-ready=list]")).to_be_attached()
    for label, value in values.items():
        control = page.get_by_label(label, exact=True)
        if control.evaluate("e => e.tagName") == "SELECT":
            control.select_option(value)
        else:
            control.fill(value)
    with page.expect_request(lambda r: "/tokentrail/v1/trajectories?" in r.url):
        page.get_by_role("button", name="Apply filters").click()
    return _listed(page)


def test_the_key_is_asked_once_and_the_list_filters_and_pages(
    browser: Browser, viewer: Proxy, shots: Path
) -> None:
    page = browser.new_page(viewport=LAPTOP)
    page.goto(viewer.url + "/tokentrail/ui/")
    expect(page.get_by_role("status")).to_contain_text("needs its API key")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    everything = ["agent-ok", "agent-broken", "agent-failed", "agent-tools", "agent-edit"]
    assert _listed(page) == everything
    row = page.locator("tbody tr", has=page.get_by_role("link", name="agent-failed"))
    cells = row.locator("td").all_inner_texts()
    assert cells[1:6] == ["3", cells[2], "—", "1", "0"], cells  # calls, tokens, reward, problems, breaks
    shoot(page, shots, "01-list")
    page.reload()  # the key stays for this tab
    assert _listed(page) == everything

    assert _filter(page, **{"Tag (key=value)": "env=prod"}) == ["agent-failed"]
    assert _filter(page, Group="g1") == ["agent-ok"]
    assert _filter(page, **{"One exact sequence": "false"}) == ["agent-broken"]
    assert "agent-broken" not in _filter(page, **{"One exact sequence": "true"})
    assert _filter(page, Finished="true") == ["agent-ok"]
    assert "agent-ok" in _filter(page, **{"Has reward": "true"})
    assert "agent-ok" not in _filter(page, **{"Has reward": "false"})
    assert _filter(page, **{"Created before": "2001-01-01T00:00"}) == []
    expect(page.get_by_text("No trajectory matches.")).to_be_visible()
    assert _filter(page, **{"Created from": "2001-01-01T00:00"}) == everything
    shoot(page, shots, "02-list-filtered")

    page.goto(viewer.url + "/tokentrail/ui/#/?limit=2")
    assert _listed(page) == everything[:2]
    _turn(page, "Next page")
    assert _listed(page) == everything[2:4]
    _turn(page, "Next page")
    assert _listed(page) == everything[4:]
    expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    _turn(page, "First page")
    assert _listed(page) == everything[:2]


def _turn(page: Page, link: str) -> None:
    """Follow a pager link and wait until the list asked for its page (until then the old page is
    still there, marked ready: reading it at once read the page before)."""
    with page.expect_request(lambda r: "/tokentrail/v1/trajectories?" in r.url):
        page.get_by_role("link", name=link).click()


def _sequences(proxy: Proxy, trajectory_id: str) -> dict[str, Any]:
    url = f"{proxy.url}/tokentrail/v1/trajectories/{trajectory_id}/sequences"
    body: dict[str, Any] = httpx.get(url, headers=AUTH).json()
    return body


def test_trajectory_page_shows_every_token_with_its_mask_logprob_and_the_break(
    browser: Browser, viewer: Proxy, shots: Path
) -> None:
    page = _page(browser, viewer, "#/t/agent-broken")
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    built = _sequences(viewer, "agent-broken")
    assert len(built["sequences"]) == 2
    (mismatch,) = built["prefix_mismatches"]
    tokens = page.locator(".tokens .tok")
    shown = tokens.evaluate_all(
        "els => els.map(e => [Number(e.dataset.id), e.dataset.mask, e.textContent, e.title])"
    )
    expected = [
        (token_id, str(mask), token_piece(token_id).replace("\n", "↵\n"), logprob)
        for sequence in built["sequences"]
        for token_id, mask, logprob in zip(
            sequence["input_ids"], sequence["loss_mask"], sequence["logprobs"], strict=True
        )
    ]
    assert [(i, m, t) for i, m, t, _title in shown] == [(i, m, t) for i, m, t, _lp in expected]
    generated = [(i, title) for i, m, _t, title in shown if m == "1"]
    assert len(generated) == sum(s["num_generated"] for s in built["sequences"]) == 4 * 6
    for token_id, title in generated:
        assert "generated, loss mask 1" in title
        assert f"logprob {fake_logprob(token_id):.4f}" in title
    # the break: marked once, before the token where the second sequence's prompt differs
    mark = page.locator(".break-mark[role=note]")
    expect(mark).to_have_count(1)
    expect(mark).to_contain_text(f"call {mismatch['seq']}, token {mismatch['position']}")
    second = page.locator(".tokens").nth(1).locator(".tok")
    expect(second.nth(mismatch["position"])).to_have_class("tok ctx break-at")
    expect(page.get_by_role("list", name="Prefix breaks")).to_contain_text("differs from the previous prompt")
    page.get_by_role("button", name=f"Call {mismatch['seq']}, token {mismatch['position']}").click()
    expect(mark).to_be_focused()
    shoot(page, shots, "03-trajectory-break")
    shoot(page, shots, "04-trajectory-break-full", full_page=True)


def test_calls_show_messages_as_sent_the_reply_and_tool_calls(
    browser: Browser, viewer: Proxy, shots: Path
) -> None:
    page = _page(browser, viewer, "#/t/agent-tools")
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    call = page.locator("details#call-0")
    call.locator("summary").click()
    body = call.locator(".call-body")
    expect(body).to_contain_text("What is the weather in Paris?")
    expect(body.locator(".tool-call").first).to_contain_text("get_weather")
    expect(body).to_contain_text("tool → call-1")
    expect(body.locator(".message.reply .tool-call")).to_have_count(1)  # the reply's own tool call
    expect(body).to_contain_text("Weight version: default")
    # what produced the tokens: the call's certificate (the fake upstream is no vLLM: no version)
    certificate = body.locator(".certificate")
    expect(certificate).to_contain_text("Certificate: ")
    expect(certificate).to_contain_text("vLLM: —")
    expect(certificate).to_contain_text("Sampling: ")
    expect(call.locator("summary")).to_contain_text("certificate ")
    shoot(page, shots, "05-trajectory-tool-call")

    page.goto(viewer.url + "/tokentrail/ui/#/t/agent-failed")
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    expect(page.locator("details.call.failed")).to_have_count(1)
    expect(page.locator("details.call.failed summary")).to_contain_text("upstream_error")


def test_reward_and_tags_edited_in_the_page_are_in_the_database(
    browser: Browser, viewer: Proxy, shots: Path
) -> None:
    page = _page(browser, viewer, "#/t/agent-edit")
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    page.get_by_label("Reward", exact=True).fill("0.75")
    page.get_by_role("button", name="Save reward").click()
    expect(page.get_by_role("status")).to_have_text("Reward saved: 0.75")
    expect(page.locator("dd[data-field=reward]")).to_have_text("0.75")
    page.get_by_label("Add tag (key=value)").fill("reviewed=yes")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("reviewed=yes")
    shoot(page, shots, "06-trajectory-edited")
    engine = create_engine(viewer.db_url)
    try:
        with engine.connect() as connection:
            reward, tags = connection.execute(
                text("SELECT reward, tags FROM trajectories WHERE id = 'agent-edit'")
            ).one()
    finally:
        engine.dispose()
    assert reward == 0.75
    assert (json.loads(tags) if isinstance(tags, str) else tags) == {"reviewed": "yes"}


def test_keyboard_reaches_the_filters_and_the_trajectories(browser: Browser, viewer: Proxy) -> None:
    page = _page(browser, viewer)
    _listed(page)
    expect(page.get_by_role("heading", name="Trajectories", level=2)).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Tag (key=value)")).to_be_focused()
    page.get_by_role("link", name="agent-ok").focus()
    page.keyboard.press("Enter")
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    expect(page.get_by_role("heading", name="Trajectory agent-ok", level=2)).to_be_focused()
    assert page.evaluate("() => document.title") == "agent-ok · TokenTrail"


def test_the_viewer_fetches_nothing_from_elsewhere(browser: Browser, viewer: Proxy) -> None:
    page = browser.new_page(viewport=LAPTOP)
    origins: set[str] = set()
    page.on("request", lambda r: origins.add(r.url.split("/tokentrail/")[0]))
    page.goto(viewer.url + "/tokentrail/ui/#/t/agent-ok")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("main[data-ready=trajectory]")).to_be_attached()
    assert origins == {viewer.url}
    csp = httpx.get(viewer.url + "/tokentrail/ui/").headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert httpx.get(viewer.url + "/tokentrail/ui/../app.py").status_code == 404
    assert httpx.get(viewer.url + "/tokentrail/ui", follow_redirects=True).status_code == 200


def test_the_key_form_hides_once_a_key_is_accepted(browser: Browser, viewer: Proxy) -> None:
    page = _page(browser, viewer)
    _listed(page)
    expect(page.get_by_label("API key")).to_be_hidden()
    page.get_by_role("button", name="Forget key").click()
    expect(page.get_by_label("API key")).to_be_visible()
