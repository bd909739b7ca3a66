"""schemathesis against TokenTrail's own API: every operation of ``/tokentrail/openapi.json`` with
generated valid and invalid inputs. No answer may be a 5xx or carry a stack trace, and the proxy must be
healthy afterwards. Derandomized, so a failure reproduces.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import FakeUpstream

API_KEY = "fuzz-key"


@pytest.fixture
def api_proxy(fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory) -> Iterator[Proxy]:
    with proxy_factory(fake[1], api_key=API_KEY) as proxy:
        for i in range(3):  # something to find: three calls in one trajectory
            httpx.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                headers={"X-Trajectory-Id": "fuzz-1", "X-Trajectory-Tags": f"run=r{i}"},
            ).raise_for_status()
        proxy.wait_records(3)
        yield proxy


def test_the_api_never_answers_5xx_or_a_stack_trace(api_proxy: Proxy) -> None:
    """schemathesis' pytest plugin does not load under this pytest, so its strategies are driven here."""
    loaded = schemathesis.openapi.from_url(api_proxy.url + "/tokentrail/openapi.json")
    operations = [result.ok() for result in loaded.get_all_operations()]
    # health, metrics, list, detail, sequences, reward, tags, finish, detokenize;
    # pause, pause state, resume, group, set group
    assert len(operations) == 14
    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):

        @given(case=operation.as_strategy(mode))  # valid inputs, then inputs that break the schema
        @settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
        def answer_is_clean(case: Any) -> None:
            for headers in ({"Authorization": f"Bearer {API_KEY}"}, {}):  # with the key, and without
                response = case.call(base_url=api_proxy.url, headers=headers)
                assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
                assert "Traceback" not in response.text
                if not headers and "/v1/" in case.formatted_path:
                    assert response.status_code == 401

        try:
            answer_is_clean()
        except Unsatisfiable:  # an operation without inputs has no invalid ones
            if mode is not schemathesis.GenerationMode.NEGATIVE:
                raise
    assert httpx.get(api_proxy.url + "/tokentrail/health").status_code == 200
