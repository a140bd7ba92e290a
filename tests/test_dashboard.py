"""The Grafana dashboard (configs/grafana/dspark.json): a well-formed dashboard with a panel for everything issue 8
asks for, whose every query uses only metric names, labels and label values that a live server's /metrics exports,
and provisioning files that point Grafana at the same datasource and dashboard folder."""

import json
import re

import httpx
import pytest
import yaml
from conftest import REPO, ServerProcess

from dspark.engine import metrics
from dspark.loadtest.sweep import scrape

GRAFANA = REPO / "configs" / "grafana"
DASHBOARD = GRAFANA / "dspark.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dspark.yml"

# Panel title -> a metric its queries must use: one entry per item of the list.
REQUIRED = {
    "Tokens/s (total)": "dspark_generation_tokens_total",
    "Tokens/s per user (p10 / p50 / p90)": "dspark_request_tokens_per_second_bucket",
    "Acceptance length per drafter": "dspark_spec_rounds_total",
    "Acceptance rate per drafter": "dspark_spec_draft_tokens_total",
    "Acceptance rate per draft position": "dspark_spec_accepted_tokens_per_pos_total",
    "Draft length distribution": "dspark_draft_length_bucket",
    "SPS curve (verification steps/s vs batch tokens)": "dspark_steps_per_second",
    "SLO attainment": "dspark_slo_requests_total",
    "TTFT p50 / p99": "dspark_time_to_first_token_seconds_bucket",
    "ITL p50 / p99": "dspark_inter_token_latency_seconds_bucket",
    "Queue (waiting requests)": "dspark_num_requests_waiting",
    "Running requests": "dspark_num_requests_running",
    "KV cache usage": "dspark_kv_cache_usage_ratio",
    "Preemptions/s": "dspark_preemptions_total",
    "429 / 503 responses": "dspark_rejected_requests_total",
    "Prefix cache hit rate": "dspark_prefix_cache_hits_total",
}
PANEL_TYPES = {"timeseries", "stat", "gauge", "heatmap", "barchart", "table", "bargauge"}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes, not by the server
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
METRIC = re.compile(r"(?<![\w:])dspark_[A-Za-z0-9_:]*")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')
SAMPLE_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# -- the checker ----------------------------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def metric_names(expr: str) -> set[str]:
    """Sample names an expression selects (string literals, e.g. label values, are not names)."""
    return set(METRIC.findall(STRING.sub('""', expr)))


def labels_used(expr: str) -> tuple[set[str], list[tuple[str, str, str]]]:
    """Labels in by/without/on/ignoring clauses, and the label matchers (label, op, value)."""
    grouped = {name.strip() for clause in GROUPING.findall(expr) for name in clause.split(",") if name.strip()}
    return grouped, MATCHER.findall(expr)


def exported(page: dict[str, float]) -> dict[str, dict[str, set[str]]]:
    """A scraped page ({'name{labels}': value}) as sample name -> label -> the values seen."""
    out: dict[str, dict[str, set[str]]] = {}
    for key in page:
        name, _, rest = key.partition("{")
        labels = out.setdefault(name, {})
        for label, value in SAMPLE_LABEL.findall(rest):
            labels.setdefault(label, set()).add(value)
    return out


def problems(dashboard: dict, samples: dict[str, dict[str, set[str]]]) -> list[str]:
    """Every query reference that the exported samples do not back: unknown metric names, labels no referenced
    metric carries, and label values (for `=` matchers) that never occur."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            names = metric_names(expr)
            found += [f"{panel['title']!r}: metric {n} not exported" for n in sorted(names - samples.keys())]
            carried: dict[str, set[str]] = {}
            for n in names & samples.keys():
                for label, values in samples[n].items():
                    carried.setdefault(label, set()).update(values)
            grouped, matchers = labels_used(expr)
            for label in sorted(grouped | {m[0] for m in matchers}):
                if label not in carried and label not in TARGET_LABELS and label != "__name__":
                    found.append(f"{panel['title']!r}: label {label} not on {sorted(names)}")
            for label, op, value in matchers:
                if op == "=" and label in carried and value not in carried[label]:
                    found.append(f"{panel['title']!r}: {label}={value!r} never exported (saw {sorted(carried[label])})")
    return found


def dashboard_metrics(dashboard: dict) -> set[str]:
    return {n for p in dashboard["panels"] for t in p["targets"] for n in metric_names(t["expr"])}


# -- the checker can fail -------------------------------------------------------------------------------------------
def test_checker_parses_names_and_labels():
    expr = ('histogram_quantile(0.5, sum by (le, drafter) (rate(dspark_draft_length_bucket{reason="dspark_x"}[1m])))'
            ' / on (drafter) sum without(le) (dspark_spec_rounds_total)')
    assert metric_names(expr) == {"dspark_draft_length_bucket", "dspark_spec_rounds_total"}
    grouped, matchers = labels_used(expr)
    assert grouped == {"le", "drafter"} and matchers == [("reason", "=", "dspark_x")]
    page = {'dspark_requests_total{endpoint="/v1/completions",status="429"}': 1.0, "dspark_preemptions_total": 0.0}
    assert exported(page) == {"dspark_requests_total": {"endpoint": {"/v1/completions"}, "status": {"429"}},
                              "dspark_preemptions_total": {}}


def test_checker_catches_bogus_names_labels_and_values():
    samples = {"dspark_requests_total": {"endpoint": {"/v1/completions"}, "status": {"200", "429"}},
               "dspark_preemptions_total": {}}

    def board(expr):
        return {"panels": [{"title": "p", "targets": [{"expr": expr}]}]}

    assert problems(board('sum by (status, instance) (rate(dspark_requests_total{status="429"}[1m]))'), samples) == []
    assert problems(board("rate(dspark_preemptions_total[1m])"), samples) == []
    assert problems(board("rate(dspark_preemption_total[1m])"), samples) == [
        "'p': metric dspark_preemption_total not exported"]
    assert problems(board("rate(dspark_requests[1m])"), samples) == ["'p': metric dspark_requests not exported"]
    assert problems(board("sum by (code) (rate(dspark_requests_total[1m]))"), samples) == [
        "'p': label code not on ['dspark_requests_total']"]
    assert problems(board('rate(dspark_requests_total{status="418"}[1m])'), samples) == [
        "'p': status='418' never exported (saw ['200', '429'])"]


# -- the dashboard and its provisioning -----------------------------------------------------------------------------
def test_dashboard_is_well_formed():
    d = load_dashboard()
    assert d["title"] and d["uid"] and d["schemaVersion"] >= 36 and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        assert p["title"].strip() and p["type"] in PANEL_TYPES, p
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and metric_names(t["expr"]), p["title"]
            # sent to Prometheus verbatim (also by the Prometheus test): no Grafana variables or macros
            assert "$" not in t["expr"], t["expr"]
    titles = [p["title"] for p in d["panels"]]
    assert len(titles) == len(set(titles))
    for title, metric in REQUIRED.items():
        assert title in titles, f"no panel {title!r}"
        panel = d["panels"][titles.index(title)]
        assert metric in {n for t in panel["targets"] for n in metric_names(t["expr"])}, (title, metric)


def test_every_defined_metric_is_on_the_dashboard():
    """A metric added to dspark/engine/metrics.py without a panel fails here (except the `vllm:` twins of our own
    gauges, exported for the routers' endpoint pickers: their `dspark_` names are on the dashboard)."""
    families = {m._name for m in vars(metrics).values() if isinstance(m, metrics.Counter | metrics.Gauge
                                                                       | metrics.Histogram)}
    families = {f for f in families if not f.startswith("vllm:")}
    used = dashboard_metrics(load_dashboard())
    used_families = used | {n[: -len(s)] for n in used for s in SUFFIXES if n.endswith(s)}
    assert families - used_families == set()


def test_provisioning_matches_the_dashboard():
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    d = load_dashboard()
    refs = [p["datasource"] for p in d["panels"]] + [t["datasource"] for p in d["panels"] for t in p["targets"]]
    assert all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs)
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


# -- against a live server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(model_dir):
    """A speculating server (adaptive: each request's first round is drafted, and the guard's step rates are
    exported) with a 2-deep queue, after traffic that creates the labelled series: a 429, a streamed greedy
    completion with an SLO, a plain chat completion."""
    s = ServerProcess(model_dir, "--speculative", "dspark", "--draft-policy", "adaptive",
                      "--max-num-batched-tokens", "256", "--max-waiting", "2")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            full = c.post("/v1/completions", json={"model": s.name, "prompt": "def f(", "max_tokens": 4, "n": 3})
            assert full.status_code == 429  # 3 sequences never fit a 2-deep waiting queue
            body = {"model": s.name, "prompt": "def parse(", "max_tokens": 16, "temperature": 0,
                    "stream": True, "slo_tokens_per_s": 1}
            assert c.post("/v1/completions", json=body).status_code == 200
            chat = {"model": s.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
        yield s
    finally:
        s.stop()


def test_every_dashboard_query_is_backed_by_metrics(live):
    samples = exported(scrape(live.url))
    assert problems(load_dashboard(), samples) == []
    # the traffic did what the dashboard needs to show something
    assert live.metric('dspark_spec_rounds_total{drafter="dspark"}') > 0
    assert live.metric('dspark_slo_requests_total{met="true"}') == 1
    assert live.metric('dspark_rejected_requests_total{reason="queue_full"}') == 1
