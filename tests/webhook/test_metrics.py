"""The Prometheus text the webhook exports."""

from __future__ import annotations

from k8s_ext_connector.webhook import metrics


def test_render() -> None:
    requests = metrics.Counter("req_total", "requests", ("result",)).preset(("a",), ("b",))
    requests.inc("a")
    requests.inc("a")
    latency = metrics.Histogram("lat_seconds", "latency", (0.01, 0.1))
    for value in (0.005, 0.01, 0.05, 3):
        latency.observe(value)
    ready = metrics.Gauge("ready", "ready", lambda: 1.0)
    assert metrics.render([requests, latency, ready]).splitlines() == [
        "# HELP req_total requests",
        "# TYPE req_total counter",
        'req_total{result="a"} 2',
        'req_total{result="b"} 0',
        "# HELP lat_seconds latency",
        "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="0.01"} 2',
        'lat_seconds_bucket{le="0.1"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 3.065",
        "lat_seconds_count 4",
        "# HELP ready ready",
        "# TYPE ready gauge",
        "ready 1",
    ]


def test_label_values_are_escaped() -> None:
    counter = metrics.Counter("c_total", "c", ("why",))
    counter.inc('a "quoted"\nline\\')
    assert r'c_total{why="a \"quoted\"\nline\\"} 1' in metrics.render([counter])
