"""How long the viewer takes to show a long trajectory: 50 calls, about 20,000 tokens in one sequence.

The prompts draw on 3,000 distinct characters (one token each in the fake's template), so the first
load decodes about 3,000 distinct token IDs through the upstream, as a real vocabulary would need;
the second load finds them cached. The times are written to ``load-times.json`` beside the
screenshots and must stay within a budget a laptop's browser can meet with room to spare.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import LAPTOP, chromium, screenshot_dir, shoot
from tests.conftest import Proxy, running_proxy
from tests.conversations import record_conversation
from tests.fake_upstream import FakeUpstream
from tests.servers import serve_in_thread

pytestmark = pytest.mark.browser

CALLS = 50
USER_CHARS = 334  # 50 x (334 + 2 role tokens + 64 generated) + the system prompt = 20,015 tokens
ALPHABET = [chr(0x4E00 + i) for i in range(3000)]
COLD_BUDGET_S = 30.0
WARM_BUDGET_S = 10.0


@pytest.fixture
def long_trajectory(tmp_path: Path) -> Iterator[Proxy]:
    upstream = FakeUpstream()
    rng = random.Random(18)
    texts = ["".join(rng.choices(ALPHABET, k=USER_CHARS)) for _ in range(CALLS)]
    with serve_in_thread(upstream) as url, running_proxy(url, tmp_path) as proxy:
        with httpx.Client(timeout=60) as client:
            record_conversation(proxy.url, "long", texts, max_tokens=64, client=client)
        proxy.wait_all_records()
        yield proxy


def test_a_trajectory_of_50_calls_and_20000_tokens_renders_within_budget(
    long_trajectory: Proxy, tmp_path: Path
) -> None:
    sequences = httpx.get(long_trajectory.url + "/tokentrail/v1/trajectories/long/sequences").json()
    (sequence,) = sequences["sequences"]
    assert 19_900 <= sequence["num_tokens"] <= 20_100
    assert sequence["num_generated"] == CALLS * 64
    distinct = len(set(sequence["input_ids"]))
    shots = screenshot_dir(tmp_path / "screenshots")
    times: dict[str, float] = {}
    with chromium() as browser:
        page = browser.new_page(viewport=LAPTOP)
        for load in ("cold", "warm"):
            start = time.perf_counter()
            page.goto(long_trajectory.url + "/tokentrail/ui/#/t/long")
            expect(page.locator("main[data-ready=trajectory]")).to_be_attached(timeout=120_000)
            times[load] = round(time.perf_counter() - start, 3)
            expect(page.locator(".tokens .tok")).to_have_count(sequence["num_tokens"])
            page.goto("about:blank")
        page.goto(long_trajectory.url + "/tokentrail/ui/#/t/long")
        expect(page.locator("main[data-ready=trajectory]")).to_be_attached(timeout=120_000)
        page.get_by_role("button", name="Training sequence").click()
        expect(page.locator("#tokens-h")).to_be_focused()
        shoot(page, shots, "07-long-trajectory-tokens")
        start = time.perf_counter()
        page.goto(long_trajectory.url + "/tokentrail/ui/#/")
        expect(page.locator("main[data-ready=list]")).to_be_attached(timeout=60_000)
        times["list"] = round(time.perf_counter() - start, 3)
    report = {"calls": CALLS, "tokens": sequence["num_tokens"], "distinct_ids": distinct, "seconds": times}
    (shots / "load-times.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"viewer load: {report}")
    assert times["cold"] < COLD_BUDGET_S, report
    assert times["warm"] < WARM_BUDGET_S, report
