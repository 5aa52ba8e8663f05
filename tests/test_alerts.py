"""The operator's monitoring files (ops/): the Prometheus scrape config and alert rules, their promtool unit tests,
the Grafana dashboard. Checked with promtool itself (Debian's `prometheus` package, installed when missing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import ROOT, ensure_debian

OPS = ROOT / "ops"


def _promtool() -> str:
    return ensure_debian(("promtool",), ("prometheus",))[0]


def _exported() -> set[str]:
    """Every series name the server's /metrics can carry (prometheus_client's suffixes included)."""
    from lmpipe.serving.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_info"))
    return names | {"up"}  # Prometheus' own, per scrape target


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=\{|\[|\)|$|\s*[<>=])", expr))
    return {w for w in words if w.startswith(("lmpipe_", "up"))} - {"upper"}


def test_shipped_rules_are_what_params_give_and_a_changed_threshold_is_caught(tmp_path: Path):
    lmpipe = [sys.executable, "-m", "lmpipe.cli", "alerts"]
    res = subprocess.run([*lmpipe, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serve"]["alerts"]["p99_latency_s"] = 2.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    res = subprocess.run([*lmpipe, "--check", "--params", str(tmp_path / "params.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"lmpipe: error: {ROOT / 'ops/prometheus/alerts.yml'} differs from what {tmp_path / 'params.yaml'} gives: "
        "run `lmpipe alerts`"], res.stderr
    from lmpipe.config import Serve
    from lmpipe.serving.alerts import rules

    latency = rules(Serve.model_validate(raw["serve"]))["groups"][0]["rules"][0]
    assert latency["alert"] == "LmpipeLatencyHigh" and latency["expr"].endswith("> 2")


def test_promtool_checks_the_config_and_the_rules_and_their_unit_tests_pass():
    promtool = _promtool()
    for args in (("check", "config", "prometheus/prometheus.yml"), ("check", "rules", "prometheus/alerts.yml"),
                 ("test", "rules", "prometheus/alerts_test.yml")):
        res = subprocess.run([promtool, *args], cwd=OPS, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    tested = yaml.safe_load((OPS / "prometheus" / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for group in tested for t in group["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for group in tested for t in group["alert_rule_test"] if not t["exp_alerts"]}
    alerts = {r["alert"] for r in yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]}
    assert fired == quiet == alerts  # each alert is tested firing and staying quiet
    exported = _exported()
    for rule in yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]:
        assert _metric_names(rule["expr"]) <= exported, (rule["alert"], _metric_names(rule["expr"]) - exported)


def test_grafana_dashboard_loads_and_every_query_is_valid_promql_over_exported_metrics(tmp_path: Path):
    dash = json.loads((OPS / "grafana" / "lmpipe.json").read_text())
    assert {"uid", "title", "schemaVersion", "panels", "templating"} <= dash.keys()
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("requests per second", "latency", "batch size", "drift", "confidence"):
        assert needed in titles, needed
    exprs = []
    for panel in dash["panels"]:
        assert {"id", "type", "title", "gridPos", "targets", "datasource"} <= panel.keys(), panel.get("title")
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["targets"] and all({"refId", "expr"} <= t.keys() for t in panel["targets"])
        exprs += [t["expr"] for t in panel["targets"]]
    # Grafana's variables as Prometheus would receive them, each query a recording rule promtool parses
    concrete = [e.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                        for i, e in enumerate(concrete)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    res = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "dashboard_rules.yml")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    exported = _exported()
    for e in concrete:
        assert _metric_names(e) and _metric_names(e) <= exported, (e, _metric_names(e) - exported)
