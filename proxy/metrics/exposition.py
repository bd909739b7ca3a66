"""The Prometheus text format of the summed values, through ``prometheus_client``.

One ``CollectorRegistry`` per app (never the library's global one, so several proxies in one process,
as in the tests, do not mix their figures), holding one collector that builds the metric families
from ``snapshot.all_values`` at each scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as Family,
)
from prometheus_client.registry import Collector

from tokentrail.proxy.metrics import catalog
from tokentrail.proxy.metrics.calls import LABEL_SEP, Values
from tokentrail.proxy.metrics.catalog import Kind, Metric


class ValuesCollector(Collector):
    """Turns ``Values`` into metric families, every catalogued metric whether observed or not."""

    def __init__(self, values: Callable[[], Values]) -> None:
        self._values = values

    def collect(self) -> Iterator[Family]:
        values = self._values()
        for metric in catalog.ALL:
            yield family(metric, values.get(metric.name, {}))


def family(metric: Metric, series: dict[str, Any]) -> Family:
    labels = list(metric.labels)
    result: Any
    if metric.kind is Kind.COUNTER:
        result = CounterMetricFamily(metric.name, metric.help, labels=labels)
    elif metric.kind is Kind.GAUGE:
        result = GaugeMetricFamily(metric.name, metric.help, labels=labels)
    else:
        result = HistogramMetricFamily(metric.name, metric.help, labels=labels)
    for key, value in sorted(series.items()):
        label_values = key.split(LABEL_SEP) if labels else []
        if len(label_values) != len(labels):
            continue  # a sibling's file from another version of the catalogue
        if metric.kind is Kind.HISTOGRAM:
            result.add_metric(label_values, _cumulative(metric, value), sum_value=value[-1])
        else:
            result.add_metric(label_values, float(value))
    return result  # type: ignore[no-any-return]


def _cumulative(metric: Metric, counts: list[float]) -> list[tuple[str, float]]:
    bounds = [*(repr(float(b)) for b in metric.buckets), "+Inf"]
    buckets: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in zip(bounds, counts[:-1], strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


def make_registry(values: Callable[[], Values]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ValuesCollector(values))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
