"""The Grafana dashboard and the metrics the code exports cannot drift apart.

Every series the dashboard queries must be a metric some actor defines with
``ray.util.metrics``, under the name Ray's Prometheus exporter gives it (a ``ray_``
prefix; ``_total`` for counters; ``_bucket``/``_sum``/``_count`` for histograms), and
every ``rlfleet_*`` metric the code defines must be on the dashboard.
"""

from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "configs" / "grafana" / "rlfleet-dashboard.json"
DEFINITION = re.compile(r"metrics\.(Gauge|Counter|Histogram)\(\s*\"(rlfleet_[a-z_]+)\"")
SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",)}


def _defined_metrics() -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in ("buffer", "collector", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for kind, name in DEFINITION.findall(path.read_text()):
                assert found.get(name, kind) == kind, f"{name} defined as {found[name]} and {kind}"
                found[name] = kind
    return found


def _queried_series() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\bray_rlfleet_[a-z_]+", e)}


def _series_to_metric(series: str, defined: dict[str, str]) -> tuple[str, str] | None:
    base = series.removeprefix("ray_")
    for name, kind in defined.items():
        for suffix in SUFFIXES[kind]:
            if base == name + suffix:
                return name, kind
    return None


def test_every_dashboard_series_is_exported_by_the_code():
    defined = _defined_metrics()
    assert len(defined) >= 19, sorted(defined)
    unknown = [s for s in sorted(_queried_series()) if _series_to_metric(s, defined) is None]
    assert unknown == [], f"dashboard queries series no code exports: {unknown}"


def test_every_exported_metric_is_on_the_dashboard():
    defined = _defined_metrics()
    shown = {_series_to_metric(s, defined) for s in _queried_series()} - {None}
    missing = sorted(set(defined) - {name for name, _ in shown})
    assert missing == [], f"metrics exported but not on the dashboard: {missing}"


def test_dashboard_panels_have_unique_ids_and_a_prometheus_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["type"] == "prometheus", panel["title"]
            assert panel["targets"], panel["title"]
