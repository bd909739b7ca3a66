"""deploy/: the Prometheus scrape example, the Grafana dashboard and the compose `monitoring` profile
parse, point at TokenTrail's metrics route, and name only metrics TokenTrail exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tokentrail.proxy.metrics import catalog
from tokentrail.proxy.metrics.catalog import Kind

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {Kind.COUNTER: ("_total",), Kind.GAUGE: ("",), Kind.HISTOGRAM: ("_bucket", "_count", "_sum")}


def _load(path: str) -> Any:
    return yaml.safe_load((REPO / path).read_text())


def test_prometheus_scrapes_the_metrics_route_of_the_compose_service() -> None:
    config = _load("deploy/prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tokentrail"]
    assert job["metrics_path"] == "/tokentrail/metrics"
    assert job["static_configs"][0]["targets"] == ["tokentrail:8000"]


def test_the_dashboard_names_only_exported_series() -> None:
    dashboard = json.loads((REPO / "deploy/grafana/tokentrail.json").read_text())
    exported = {m.name + suffix for m in catalog.ALL for suffix in SUFFIXES[m.kind]}
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus"
        for target in panel["targets"]:
            used |= set(re.findall(r"tokentrail_[a-z_]+", target["expr"]))
    assert used, "no query in the dashboard"
    assert used <= exported, used - exported
    missing = [m.name for m in catalog.ALL if not any(n.startswith(m.name) for n in used)]
    assert not missing, f"metrics without a panel: {missing}"
    datasource = _load("deploy/grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["uid"] == "prometheus"


def test_monitoring_is_an_opt_in_compose_profile_with_files_that_exist() -> None:
    compose = _load("docker-compose.yml")
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source
    default = [name for name, service in services.items() if not service.get("profiles")]
    assert sorted(default) == ["tokentrail", "vllm"], "a plain `docker compose up` must stay as it was"
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])
