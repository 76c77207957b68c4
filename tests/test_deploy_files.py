"""The deployment files hang together: ``otel-collector.yaml`` (OTLP in, traces to Jaeger,
metrics to Prometheus), ``deploy/docker-compose.yaml`` and ``deploy/prometheus.yml``.

Docker is not available where the tests run, so the stack itself is never started here;
these checks catch what breaks such files in practice: a pipeline naming a component that
is not defined, a port published on one side and not the other, the config mounted where
the collector does not look, the removed ``jaeger`` exporter, an unpinned image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR = yaml.safe_load((ROOT / "otel-collector.yaml").read_text())
COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yaml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def test_the_collector_receives_otlp_on_the_standard_ports_of_every_interface():
    protocols = COLLECTOR["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"


def test_every_pipeline_names_defined_components_and_the_right_destinations():
    service = COLLECTOR["service"]
    for kind in ("receivers", "processors", "exporters"):
        defined = set(COLLECTOR.get(kind) or {})
        for name, pipeline in service["pipelines"].items():
            missing = set(pipeline.get(kind, [])) - defined
            assert not missing, f"pipeline {name} uses undefined {kind}: {missing}"
    assert set(service.get("extensions", [])) <= set(COLLECTOR.get("extensions") or {})
    traces = service["pipelines"]["traces"]
    metrics = service["pipelines"]["metrics"]
    assert traces["receivers"] == ["otlp"] and metrics["receivers"] == ["otlp"]
    # memory_limiter must come first in a pipeline (the collector's own guidance)
    for pipeline in (traces, metrics):
        assert pipeline["processors"][0] == "memory_limiter"
    (trace_exporter,) = traces["exporters"]
    assert trace_exporter.split("/")[0] in ("otlp_grpc", "otlp")  # otlp: deprecated alias
    jaeger_endpoint = COLLECTOR["exporters"][trace_exporter]["endpoint"]
    assert jaeger_endpoint.split(":")[0] == "jaeger" and _port(jaeger_endpoint) == 4317
    assert metrics["exporters"] == ["prometheus"]
    # the jaeger exporter was removed from collector-contrib (v0.85): Jaeger takes OTLP
    assert not any(name.split("/")[0] == "jaeger" for name in COLLECTOR["exporters"])


def test_compose_runs_the_collector_with_this_config_and_publishes_its_ports():
    services = COMPOSE["services"]
    assert {"otel-collector", "jaeger", "prometheus"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
    collector = services["otel-collector"]
    assert "opentelemetry-collector-contrib" in collector["image"]
    (config_arg,) = [a for a in collector["command"] if a.startswith("--config=")]
    config_path = config_arg.split("=", 1)[1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in collector["volumes"]}
    assert config_path in mounts
    mounted = (ROOT / "deploy" / mounts[config_path]).resolve()  # relative to the file
    assert mounted == (ROOT / "otel-collector.yaml").resolve()
    published = _published(collector)
    assert {4317, 4318} <= published
    prometheus_port = _port(COLLECTOR["exporters"]["prometheus"]["endpoint"])
    health_port = _port(COLLECTOR["extensions"]["health_check"]["endpoint"])
    assert {prometheus_port, health_port} <= published
    assert 16686 in _published(services["jaeger"])  # the Jaeger UI
    assert 9090 in _published(services["prometheus"])


def test_prometheus_scrapes_the_collectors_exporter_with_the_mounted_config():
    prometheus = COMPOSE["services"]["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    source = mounts[config_arg.split("=", 1)[1]]
    assert (ROOT / "deploy" / source).resolve() == (ROOT / "deploy" / "prometheus.yml").resolve()
    targets = [
        target
        for job in PROMETHEUS["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    prometheus_port = _port(COLLECTOR["exporters"]["prometheus"]["endpoint"])
    assert f"otel-collector:{prometheus_port}" in targets
