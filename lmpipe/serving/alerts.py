"""Prometheus alert rules for what `lmpipe serve` exports on /metrics, with their thresholds from params.yaml.

    lmpipe alerts                          # writes ops/prometheus/alerts.yml from params.yaml's serve section
    lmpipe alerts --check                  # exit 1 when the shipped file differs from what params.yaml gives

params.yaml is the one home of the thresholds (`serve.alerts`, and `serve.monitor.psi_alert` for drift); the
shipped ops/prometheus/alerts.yml is this module's output for them (tests/test_alerts.py keeps it so), next to
ops/prometheus/prometheus.yml (the scrape config), alerts_test.yml (promtool's unit tests: each alert fires, and
stays quiet) and ops/grafana/lmpipe.json (the dashboard). docs/serving.md#alerts shows how to run them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmpipe.config import Serve

RULES_FILE = Path("ops/prometheus/alerts.yml")
SERVING_ROUTES = "/predict|/embed|/generate"
"""The routes that are traffic (health checks and scrapes are not)."""


def rules(cfg: Serve) -> dict[str, Any]:
    """The rule file (Prometheus' YAML as a dict) for the `serve` section `cfg`."""
    a, w = cfg.alerts, f"{cfg.alerts.window_minutes}m"
    total = f"sum(rate(lmpipe_requests_total[{w}]))"

    def share(statuses: str) -> str:
        return f'sum(rate(lmpipe_requests_total{{status=~"{statuses}"}}[{w}])) / {total}'

    def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
                "annotations": {"summary": summary, "description": description}}

    return {"groups": [{"name": "lmpipe-serve", "rules": [
        alert("LmpipeLatencyHigh",
              f"histogram_quantile(0.99, sum by (le, route) (rate(lmpipe_request_latency_seconds_bucket"
              f'{{route=~"{SERVING_ROUTES}"}}[{w}]))) > {a.p99_latency_s:g}',
              w, "warning", "p99 latency of {{ $labels.route }} above " + f"{a.p99_latency_s:g} s",
              "{{ $value | humanizeDuration }} at the 99th percentile over " + f"{w} (serve.alerts.p99_latency_s)."),
        alert("LmpipeErrors", f"{share('5..')} > {a.error_share:g}", w, "critical",
              "more than " + f"{a.error_share:.0%}" + " of requests answered 5xx",
              "{{ $value | humanizePercentage }} of requests over " + f"{w} failed (serve.alerts.error_share)."),
        alert("LmpipeSaturated", f"{share('503|504')} > {a.saturation_share:g}", w, "warning",
              "requests refused for a full queue (503) or slow inference (504)",
              "{{ $value | humanizePercentage }} of requests over " + f"{w}" + " answered 503/504: add workers or "
              "replicas, or raise serve.max_queue (serve.alerts.saturation_share)."),
        alert("LmpipeDrift", f"max by (feature) (lmpipe_drift_psi) > {cfg.monitor.psi_alert:g}", w, "warning",
              "live traffic drifted from the training data ({{ $labels.feature }})",
              "PSI {{ $value }} of feature {{ $labels.feature }} over the last " + f"{cfg.monitor.window}"
              " texts (serve.monitor.psi_alert); `lmpipe monitor` shows the table."),
        alert("LmpipeReloadFailed", f"increase(lmpipe_model_reload_failures_total[{w}]) > 0", "0m", "critical",
              "a new model version failed to load; the old one is still served",
              "The alias moved to a version the server could not load (its log has the reason); it serves the "
              "previous version until the alias moves on or POST /admin/reload succeeds."),
        # `or vector(0)`: a server that never had a request has no such series at all
        alert("LmpipeNoTraffic", f'(sum(rate(lmpipe_requests_total{{route=~"{SERVING_ROUTES}"}}'
                                 f'[{a.quiet_minutes:g}m])) or vector(0)) == 0 and on() (max(up{{job="lmpipe"}}) == 1)',
              "1m", "info",
              f"no /predict, /embed or /generate request for {a.quiet_minutes:g} minutes",
              "The server is up and scraped but nobody calls it (serve.alerts.quiet_minutes)."),
        alert("LmpipeDown", 'up{job="lmpipe"} == 0', "1m", "critical", "the lmpipe server does not answer /metrics",
              "Prometheus could not scrape {{ $labels.instance }} for a minute."),
    ]}]}


def render(cfg: Serve) -> str:
    head = ("# Written by `lmpipe alerts` from params.yaml (serve.alerts, serve.monitor.psi_alert): edit params.yaml,\n"
            "# then run `lmpipe alerts`. `promtool check rules` / `promtool test rules alerts_test.yml` check it.\n")
    return head + yaml.safe_dump(rules(cfg), sort_keys=False, width=120)


def write(cfg: Serve, root: Path, check: bool = False) -> tuple[Path, bool]:
    """Write (or with `check`, compare) root/RULES_FILE; returns (path, whether it already matched)."""
    path = root / RULES_FILE
    text = render(cfg)
    same = path.is_file() and path.read_text() == text
    if not check and not same:
        from lmpipe.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path, same
