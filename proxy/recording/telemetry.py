"""OpenTelemetry: one span per recorded call, with the attributes Strands' recorder sets.

Off unless the standard variables configure an exporter (``OTEL_TRACES_EXPORTER=otlp|console`` or an
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``); then the relay, which otherwise never touches OpenTelemetry,
adds a span per call, and FastAPI's instrumentation covers TokenTrail's own routes. The span is a
child of the client's ``traceparent`` when it sends one, so it lands in the agent's own trace next to
Strands' ``chat`` span, and tools that read ``llm.hosted_vllm.*`` from there can read the proxy's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from tokentrail.proxy import __version__
from tokentrail.proxy.errors import ConfigurationError
from tokentrail.proxy.recording.records import CallRecord

SPAN_NAME = "tokentrail.call"


def tracer_provider_from_environment(environ: Mapping[str, str]) -> TracerProvider | None:
    """A provider exporting as the OTEL_* variables say, or None when they configure nothing."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    names = environ.get("OTEL_TRACES_EXPORTER") or ("otlp" if endpoint else "none")
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none"
            )
    if not exporters:
        return None
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "tokentrail"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class CallSpans:
    """Turns finished call records into spans."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer("tokentrail.proxy", __version__)

    def record(self, record: CallRecord, headers: list[tuple[bytes, bytes]]) -> None:
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
        parent = propagate.extract(carrier)
        attributes: dict[str, Any] = {
            "tokentrail.trajectory_id": record.trajectory_id,
            "tokentrail.call_id": record.call_id,
            "tokentrail.outcome": str(record.outcome),
            "tokentrail.integrity": str(record.integrity),
            "http.route": record.route,
        }
        if record.status_code is not None:
            attributes["http.response.status_code"] = record.status_code
        if record.model is not None:
            attributes["gen_ai.request.model"] = record.model
        prompt_ids = record.load_prompt_ids()
        if prompt_ids is not None:
            attributes["llm.token_count.prompt"] = len(prompt_ids)
            attributes["llm.hosted_vllm.prompt_token_ids"] = prompt_ids
        if record.choices:
            generated = record.choices[0].token_ids
            attributes["llm.token_count.completion"] = len(generated)
            attributes["llm.hosted_vllm.response_token_ids"] = generated
        span = self._tracer.start_span(
            SPAN_NAME,
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=int(record.received_at * 1e9),
            attributes=attributes,
        )
        if record.outcome != "ok":
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(record.outcome)))
        span.end(end_time=int((record.finished_at or record.received_at) * 1e9))
