"""OpenTelemetry: a span per recorded call with Strands' recorder attributes; off unless configured."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import PROMPT_IDS, FakeUpstream
from tokentrail.proxy.errors import ConfigurationError
from tokentrail.proxy.recording.telemetry import tracer_provider_from_environment

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def traced(
    fake: tuple[FakeUpstream, str], proxy_factory: ProxyFactory
) -> Iterator[tuple[Proxy, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with proxy_factory(fake[1], tracer_provider=provider) as proxy:
        yield proxy, exporter
    provider.shutdown()


def test_each_recorded_call_gets_a_span_with_the_recorder_attributes(
    traced: tuple[Proxy, InMemorySpanExporter],
) -> None:
    proxy, exporter = traced
    headers = {"X-Trajectory-Id": "spanned", "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}
    httpx.post(proxy.url + CHAT, json={**BODY, "stream": True}, headers=headers)
    httpx.get(proxy.url + "/v1/models")  # pass-through: no span
    proxy.wait_all_records()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "tokentrail.call"]
    attributes = dict(span.attributes or {})
    assert attributes["llm.token_count.prompt"] == len(PROMPT_IDS)
    assert list(attributes["llm.hosted_vllm.prompt_token_ids"]) == PROMPT_IDS  # type: ignore[arg-type]
    assert attributes["llm.token_count.completion"] == 3
    assert list(attributes["llm.hosted_vllm.response_token_ids"]) == [100, 107, 114]  # type: ignore[arg-type]
    assert attributes["tokentrail.trajectory_id"] == "spanned"
    assert attributes["tokentrail.outcome"] == "ok"
    assert format(span.context.trace_id, "032x") == TRACE_ID, "the span joins the client's trace"
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time >= span.start_time


def test_own_routes_are_instrumented(traced: tuple[Proxy, InMemorySpanExporter]) -> None:
    proxy, exporter = traced
    httpx.get(proxy.url + "/tokentrail/health")
    assert any("/tokentrail/health" in s.name for s in exporter.get_finished_spans())


@pytest.mark.parametrize(
    ("environ", "configured"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_spans_are_off_unless_the_otel_variables_configure_an_exporter(
    environ: dict[str, str], configured: bool
) -> None:
    provider = tracer_provider_from_environment(environ)
    assert (provider is not None) == configured
    if provider is not None:
        provider.shutdown()


def test_an_unknown_exporter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="zipkin"):
        tracer_provider_from_environment({"OTEL_TRACES_EXPORTER": "zipkin"})
