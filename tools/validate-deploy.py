#!/usr/bin/env python3
"""Validates the shipped deployment files without a cluster or a Docker engine: lints and renders the
Helm chart (helm-python-sdk, the Helm v4 SDK), parses every rendered manifest and docker-compose.yml,
and checks that they point at the ports and probes vexil serves."""
import sys
from pathlib import Path

import helm_python
import yaml

root = Path(__file__).resolve().parent.parent
failures = []

lint = helm_python.lint(str(root / "helm/vexil"), strict=True)
failures += [f"helm lint: {m}" for m in lint.get("errors", [])]

rendered = helm_python.Chart.load(str(root / "helm/vexil")).render()
kinds = {}
for name, text in rendered.items():
    for doc in yaml.safe_load_all(text):
        if doc:
            kinds[doc["kind"]] = doc
for kind in ("Deployment", "Service", "ConfigMap"):
    if kind not in kinds:
        failures.append(f"the chart renders no {kind}")
if "Deployment" in kinds:
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["containerPort"] for p in container["ports"]}
    if ports != {8013, 8014, 8015, 8016}:
        failures.append(f"container ports {sorted(ports)}")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        failures.append("the readiness probe is not /readyz")
    if container["args"][:2] != ["start", "--uri"]:
        failures.append(f"container args {container['args']}")
if "ConfigMap" in kinds:
    import json
    json.loads(kinds["ConfigMap"]["data"]["flags.json"])

compose = yaml.safe_load((root / "docker-compose.yml").read_text())
service = compose["services"]["vexil"]
if sorted(service["ports"]) != ["8013:8013", "8014:8014", "8015:8015", "8016:8016"]:
    failures.append(f"compose ports {service['ports']}")

for f in failures:
    print("FAIL", f)
print(f"deployment files: {len(rendered)} chart templates rendered, {len(failures)} problems")
sys.exit(1 if failures else 0)
