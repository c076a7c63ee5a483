"""The Grafana dashboard (k8s/base/grafana/rlhf-loop.json) asks only for metrics that exist.

    .venv/bin/python -m pytest -q tests/deploy/test_dashboard.py

Every PromQL query of every panel names metrics that the service (service/metrics.py) or the
trainer (trainer/metrics.py) exports, sample by sample (a counter's `_total`, a histogram's
`_bucket`/`_sum`/`_count`). tests/trainer/test_metrics.py checks that each trainer metric
shows on a live trainer's /metrics after a round; the service's tests do the same for its own.
"""

from __future__ import annotations

import json
import re

import pytest
from deploy_support import DASHBOARD
from prometheus_client.metrics import MetricWrapperBase

from rlhf_loop.service import metrics as service_metrics
from rlhf_loop.trainer import metrics as trainer_metrics

SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def exported() -> set[str]:
    """Every sample name the service's and the trainer's metric objects can put on /metrics."""
    names = set()
    for module in (service_metrics, trainer_metrics):
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                (family,) = obj.describe()
                names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, label names or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)  # matchers, ranges, Grafana variables
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)  # an identifier not called as a function
    return {n for n in names if n not in PROMQL_WORDS}


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_the_extractor_sees_metrics_and_only_metrics():
    expr = ('sum by (policy_version) (rate(rlhf_votes_total{rating="up", x=~"a.b"}[5m])) / ignoring(le) '
            "histogram_quantile(0.95, sum by (le) (rate(made_up_bucket[$__rate_interval]))) - time() + 2 * up")
    assert metric_names(expr) == {"rlhf_votes_total", "made_up_bucket", "up"}
    assert "made_up_bucket" not in exported() and "rlhf_votes_total" in exported()


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_every_query_names_exported_metrics(panel):
    for target in panel["targets"]:
        names = metric_names(target["expr"])
        assert names, f"{target['expr']!r} reads no metric"
        assert names <= exported(), f"{panel['title']!r}: no such metric {sorted(names - exported())}"


def test_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "rlhf-loop" and dash["schemaVersion"] >= 36
    (ds,) = dash["templating"]["list"]
    assert ds == {**ds, "name": "datasource", "type": "datasource", "query": "prometheus"}, "import picks the Prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_it_shows_what_the_issue_asks_for():
    read = set().union(*(metric_names(t["expr"]) for p in panels() for t in p["targets"]))
    wanted = {
        "rlhf_votes_total": "approval by version", "rlhf_requests_total": "requests/s",
        "rlhf_generation_seconds_bucket": "latency", "rlhf_spool_depth": "spool depth",
        "rlhf_policy_swaps_total": "swaps", "rlhf_trainer_rounds_total": "rounds",
        "rlhf_trainer_kl_to_reference": "KL", "rlhf_trainer_reward": "reward",
        "rlhf_trainer_last_vote_timestamp_seconds": "freshness", "rlhf_trainer_consumer_lag": "lag",
    }
    assert not set(wanted) - read, [wanted[m] for m in set(wanted) - read]
