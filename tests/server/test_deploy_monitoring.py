"""The monitoring files in deploy/ stay true to what the server exports: every series the Grafana
dashboard queries exists in a replica's /metrics, and the manifests parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tokenmill.engine.core import EngineStats
from tokenmill.server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_names() -> set[str]:
    m = ServerMetrics("m")
    m.engine.stats = EngineStats(1, 0, 0.1, 0, 0, 0, 0, 0, 0)
    names = set()
    for line in m.exposition("tokenmill").decode().splitlines():
        if line.startswith("# TYPE "):  # labelled series with no sample yet still declare their type
            _, _, name, kind = line.split()
            names |= {name, f"{name}_total"} if kind == "counter" else {name}
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_exported_series():
    dash = json.loads((DEPLOY / "grafana" / "tokenmill-dashboard.json").read_text())
    exported = _exported_names()
    queried = {name for p in dash["panels"] for t in p["targets"]
               for name in re.findall(r"tokenmill:[a-z0-9_]+", t["expr"])}
    assert len(dash["panels"]) >= 8 and queried
    assert queried <= exported, sorted(queried - exported)


def test_manifests_parse():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in prom["scrape_configs"]} == {"tokenmill", "tokenmill-router"}
    monitor = yaml.safe_load((DEPLOY / "kubernetes" / "servicemonitor.yaml").read_text())
    wanted = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    services = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "tokenmill.yaml").read_text())
                if d and d.get("kind") == "Service"]
    assert {s["metadata"]["labels"]["app"] for s in services} == wanted
    assert all(any(p["name"] == "http" for p in s["spec"]["ports"]) for s in services)
