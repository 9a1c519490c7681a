"""Checks of the deployment files that need no Docker and no cluster; run by deploy/check.

    python3 deploy/check.py files          # structure of compose, Kubernetes, Dockerfile,
                                           # Prometheus, Grafana; metric names and labels
    python3 deploy/check.py binary BIN     # the sluice binary accepts every config file,
                                           # flag, environment variable and probe command

Each problem is printed on its own line; the exit status is 1 if there was any.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
# Layered over COMPOSE: two replicas sharing one budget through Redis.
COMPOSE_SHARED = DEPLOY / "docker-compose.shared.yml"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "sluice-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# The metrics contract: name -> labels. Histograms also expose _bucket (with le), _sum, _count.
COUNTERS_AND_GAUGES = {
    "sluice_upstream_ratelimit_limit": {"org", "model", "resource"},
    "sluice_upstream_ratelimit_remaining": {"org", "model", "resource"},
    "sluice_upstream_ratelimit_reset_seconds": {"org", "model", "resource"},
    "sluice_bucket_available": {"org", "model", "resource"},
    "sluice_requests_total": {"org", "model", "endpoint", "status"},
    "sluice_upstream_429_total": {"org", "model", "reason"},
    "sluice_retries_total": {"org", "model", "reason"},
    "sluice_circuit_open": {"org", "model"},
    "sluice_queue_depth": {"org", "model", "priority"},
    "sluice_queue_rejections_total": {"org", "model", "reason"},
    "sluice_tokens_reserved_total": {"org", "model"},
    "sluice_tokens_used_total": {"org", "model", "kind"},
    "sluice_config_reloads_total": {"result"},
    "sluice_config_last_reload_successful": set(),
    "sluice_config_last_reload_success_timestamp_seconds": set(),
    "sluice_build_info": {"version"},
    "sluice_buckets": set(),
    "sluice_buckets_evicted_total": set(),
    "sluice_bucket_cap_reached_total": {"outcome"},
    # Only with a shared store ([shared] redis_url).
    "sluice_shared_store_up": set(),
    "sluice_shared_store_errors_total": {"kind"},
    "sluice_shared_replicas": set(),
}
HISTOGRAMS = {
    "sluice_queue_wait_seconds": {"org", "model"},
    "sluice_prompt_estimate_ratio": {"model"},
    "sluice_upstream_duration_seconds": {"org", "model", "endpoint"},
    "sluice_upstream_ttfb_seconds": {"org", "model", "endpoint"},
    "sluice_overhead_seconds": set(),
    "sluice_shared_store_duration_seconds": set(),
}


def contract():
    """Every series name sluice exposes, with the labels it may carry."""
    names = dict(COUNTERS_AND_GAUGES)
    for name, labels in HISTOGRAMS.items():
        names[f"{name}_bucket"] = labels | {"le"}
        names[f"{name}_sum"] = labels
        names[f"{name}_count"] = labels
    return names


class Problems:
    def __init__(self):
        self.items = []

    def __call__(self, where, message):
        self.items.append(f"{where}: {message}")

    def require(self, condition, where, message):
        if not condition:
            self(where, message)
        return bool(condition)


def rel(path):
    return str(Path(path).resolve().relative_to(ROOT))


def load_yaml_documents(path, problems):
    try:
        with open(path, encoding="utf-8") as f:
            return [doc for doc in yaml.safe_load_all(f) if doc is not None]
    except (OSError, yaml.YAMLError) as err:
        problems(rel(path), f"cannot parse: {err}")
        return []


# --- Dockerfile --------------------------------------------------------------------------

def dockerfile_instructions(path=ROOT / "Dockerfile"):
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    result = []
    for line in lines:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def dockerfile_stages(instructions):
    """Stage name -> its instructions (FROM first)."""
    stages, name = {}, None
    for word, rest in instructions:
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            stages[name] = []
        if name is not None:
            stages[name].append((word, rest))
    return stages


def image_env(stage):
    env = {}
    for word, rest in stage:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def check_dockerfile(problems):
    where = "Dockerfile"
    instructions = dockerfile_instructions()
    stages = dockerfile_stages(instructions)
    if not problems.require(stages, where, "no stages"):
        return
    final = list(stages.values())[-1]
    base = final[0][1].split()[0]
    problems.require(base.startswith("gcr.io/distroless/cc-debian12"), where,
                     f"final stage should be distroless cc-debian12, is {base}")
    problems.require(":nonroot" in base, where, "final stage should use the :nonroot image")
    env = image_env(final)
    problems.require(env.get("SLUICE_LISTEN") == "0.0.0.0:8787", where,
                     "final stage should set SLUICE_LISTEN=0.0.0.0:8787")
    problems.require("SLUICE_ALLOW_UNAUTHENTICATED" not in env, where,
                     "the image must not turn off client authentication itself")
    words = dict(final)
    problems.require("8787" in words.get("EXPOSE", ""), where, "final stage should EXPOSE 8787")
    problems.require(json_array(words.get("ENTRYPOINT")) == ["/usr/local/bin/sluice"], where,
                     "ENTRYPOINT should be [\"/usr/local/bin/sluice\"]")
    health = words.get("HEALTHCHECK", "")
    cmd = json_array(health.partition("CMD")[2]) if "CMD" in health else None
    problems.require(cmd == ["/usr/local/bin/sluice", "healthcheck"], where,
                     "HEALTHCHECK should run /usr/local/bin/sluice healthcheck")
    problems.require(any(w == "COPY" and r.endswith("/usr/local/bin/sluice") for w, r in final),
                     where, "final stage should copy the binary to /usr/local/bin/sluice")
    user = words.get("USER", "")
    problems.require(user.split(":")[0].isdigit() and user.split(":")[0] != "0", where,
                     "final stage should run as a numeric non-root USER")
    # Every target cargo must find while building the dependency layer needs a stub.
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for bench in cargo.get("bench", []):
        path = bench.get("path", f"benches/{bench['name']}.rs")
        problems.require(path in text, where, f"no stub for [[bench]] {bench['name']} ({path})")
    for member in cargo.get("workspace", {}).get("members", []):
        manifest = "Cargo.toml" if member == "." else f"{member}/Cargo.toml"
        problems.require(manifest in text, where, f"workspace member {member}: {manifest} not copied")
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    for entry in ("target/", ".git/", ".venv/"):
        problems.require(entry in ignore, ".dockerignore", f"should exclude {entry}")
    for needed in ("src", "mock", "benches", "Cargo.toml", "Cargo.lock"):
        problems.require(needed not in ignore and f"{needed}/" not in ignore, ".dockerignore",
                         f"must not exclude {needed}")
    return stages


def json_array(text):
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


# --- docker compose ----------------------------------------------------------------------

def check_compose(problems, stages):
    where = rel(COMPOSE)
    docs = load_yaml_documents(COMPOSE, problems)
    if not problems.require(len(docs) == 1 and isinstance(docs[0], dict), where,
                            "should be one YAML mapping"):
        return
    services = docs[0].get("services") or {}
    for name in ("sluice", "app", "prometheus", "grafana"):
        problems.require(name in services, where, f"no service {name}")
    for name, service in services.items():
        at = f"{where}: services.{name}"
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if problems.require(dockerfile.is_file(), at, f"build file {dockerfile} missing"):
                target = build.get("target")
                problems.require(target is None or target in (stages or {}), at,
                                 f"build target {target} is not a stage of the Dockerfile")
        else:
            problems.require("image" in service, at, "neither build nor image")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                problems.require((COMPOSE.parent / source).exists(), at,
                                 f"mounted path {source} does not exist")
    sluice = services.get("sluice") or {}
    at = f"{where}: services.sluice"
    test = (sluice.get("healthcheck") or {}).get("test") or []
    problems.require(test[:1] == ["CMD"] and "healthcheck" in test, at,
                     "healthcheck.test should be [CMD, /usr/local/bin/sluice, healthcheck]")
    ports = [str(p) for p in sluice.get("ports", [])]
    problems.require(any(p.split(":")[-1] == "8787" for p in ports), at, "8787 not published")
    env = sluice.get("environment") or {}
    problems.require(isinstance(env, dict), at, "environment should be a mapping")
    if isinstance(env, dict):
        config = env.get("SLUICE_CONFIG")
        mounts = [v.split(":")[1] for v in sluice.get("volumes", []) if isinstance(v, str)]
        problems.require(config in mounts, at, f"SLUICE_CONFIG={config} is not a mounted file")
        problems.require("SLUICE_ALLOW_UNAUTHENTICATED" not in env, at,
                         "the demo should authenticate clients, not turn it off")
    app_env = (services.get("app") or {}).get("environment") or {}
    problems.require(app_env.get("OPENAI_BASE_URL") == "http://sluice:8787/v1", f"{where}: services.app",
                     "OPENAI_BASE_URL should be http://sluice:8787/v1")
    mock = services.get("mock")
    if mock is not None:
        problems.require("mock" in (mock.get("profiles") or []), f"{where}: services.mock",
                         "should only run with --profile mock")


def check_compose_shared(problems):
    where = rel(COMPOSE_SHARED)
    docs = load_yaml_documents(COMPOSE_SHARED, problems)
    if not problems.require(len(docs) == 1 and isinstance(docs[0], dict), where,
                            "should be one YAML mapping"):
        return
    services = docs[0].get("services") or {}
    base = (yaml.safe_load(COMPOSE.read_text(encoding="utf-8")) or {}).get("services") or {}
    for name in ("redis", "sluice", "sluice-2", "app-2"):
        problems.require(name in services, where, f"no service {name}")
    redis = services.get("redis") or {}
    problems.require("image" in redis, f"{where}: services.redis", "needs an image")
    urls = {}
    for name in ("sluice", "sluice-2"):
        at = f"{where}: services.{name}"
        service = services.get(name) or {}
        env = service.get("environment") or {}
        urls[name] = env.get("SLUICE_REDIS_URL")
        problems.require(str(urls[name]).startswith("redis://redis:"), at,
                         "SLUICE_REDIS_URL should name the redis service")
        problems.require(((service.get("depends_on") or {}).get("redis") or {}).get("condition")
                         == "service_healthy", at, "should wait for redis to be healthy")
    problems.require(len(set(urls.values())) == 1, where,
                     "both replicas must share one store (the same SLUICE_REDIS_URL)")
    first, second = base.get("sluice") or {}, services.get("sluice-2") or {}
    at = f"{where}: services.sluice-2"
    problems.require(second.get("image") == first.get("image"), at,
                     "should run the image the first replica builds")
    problems.require(second.get("volumes") == first.get("volumes"), at,
                     "should mount the first replica's configuration")
    first_env = first.get("environment") or {}
    second_env = second.get("environment") or {}
    for key in ("SLUICE_CONFIG", "SLUICE_UPSTREAM", "OPENAI_API_KEY", "SLUICE_CLIENT_TOKENS"):
        problems.require(second_env.get(key) == first_env.get(key), at,
                         f"{key} differs from the first replica's")
    test = (second.get("healthcheck") or {}).get("test") or []
    problems.require(test[:1] == ["CMD"] and "healthcheck" in test, at,
                     "healthcheck.test should be [CMD, /usr/local/bin/sluice, healthcheck]")
    problems.require("ports" not in second, at, "the second replica is not published on the host")
    app_env = (services.get("app-2") or {}).get("environment") or {}
    problems.require(app_env.get("OPENAI_BASE_URL") == "http://sluice-2:8787/v1",
                     f"{where}: services.app-2", "OPENAI_BASE_URL should be http://sluice-2:8787/v1")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                problems.require((COMPOSE_SHARED.parent / source).exists(), f"{where}: services.{name}",
                                 f"mounted path {source} does not exist")


# --- Kubernetes --------------------------------------------------------------------------

def kubernetes_objects(problems):
    objects = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in load_yaml_documents(path, problems):
            objects.append((path, doc))
    return objects


def sluice_container(deployment):
    spec = deployment["spec"]["template"]["spec"]
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        if container.get("name") == "sluice":
            return container
    return None


def check_kubernetes(problems):
    objects = kubernetes_objects(problems)
    by_kind = {}
    for path, doc in objects:
        where = rel(path)
        if not problems.require(isinstance(doc, dict), where, "a document is not a mapping"):
            continue
        kind = doc.get("kind")
        by_kind.setdefault(kind, []).append((path, doc))
        if kind == "Kustomization":
            for resource in doc.get("resources", []):
                problems.require((path.parent / resource).exists(), where,
                                 f"resource {resource} does not exist")
            continue
        problems.require(doc.get("apiVersion") and kind and (doc.get("metadata") or {}).get("name"),
                         where, "every object needs apiVersion, kind and metadata.name")
    configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for _, d in by_kind.get("Secret", [])}
    services = {d["metadata"]["name"]: d for _, d in by_kind.get("Service", [])}
    # The app's Deployment carries the sidecar; others (the shared store's Redis) do not.
    deployments = [(path, d) for path, d in by_kind.get("Deployment", []) if sluice_container(d)]
    problems.require(deployments, rel(KUBERNETES), "no Deployment with a container named sluice")
    for path, deployment in deployments:
        where = f"{rel(path)}: {deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]
        container = sluice_container(deployment)
        # Several replicas must share one budget: a Redis Service the sidecars all name.
        env = {var.get("name"): var.get("value") for var in container.get("env", [])}
        if (deployment["spec"].get("replicas") or 1) > 1:
            url = env.get("SLUICE_REDIS_URL") or ""
            problems.require(url, where, "several replicas without SLUICE_REDIS_URL would each "
                             "spend the whole budget")
            match = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", url)
            host, port = (match.group(1), int(match.group(2) or 6379)) if match else ("", 0)
            service = services.get(host)
            if problems.require(service, where, f"SLUICE_REDIS_URL names {host!r}, no Service of "
                                "the manifests"):
                ports = {p.get("port") for p in service["spec"].get("ports", [])}
                problems.require(port in ports, where,
                                 f"Service {host} does not serve port {port}")
        args = container.get("args", [])
        flags = dict(zip(args[::2], args[1::2]))
        problems.require(flags.get("--listen", "").startswith("127.0.0.1:"), where,
                         "sluice should listen on loopback only (--listen 127.0.0.1:PORT)")
        listen_port = flags.get("--listen", ":").rsplit(":", 1)[1]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = ((container.get(probe) or {}).get("exec") or {}).get("command") or []
            if probe != "startupProbe" or probe in container:
                problems.require(command[:2] == ["/usr/local/bin/sluice", "healthcheck"], where,
                                 f"{probe} should exec /usr/local/bin/sluice healthcheck")
        security = container.get("securityContext") or {}
        problems.require(security.get("runAsNonRoot") is True, where, "runAsNonRoot should be true")
        problems.require(security.get("readOnlyRootFilesystem") is True, where,
                         "readOnlyRootFilesystem should be true")
        problems.require(security.get("allowPrivilegeEscalation") is False, where,
                         "allowPrivilegeEscalation should be false")
        resources = container.get("resources") or {}
        problems.require(resources.get("requests") and resources.get("limits"), where,
                         "sluice needs resource requests and limits")
        annotations = pod.get("metadata", {}).get("annotations") or {}
        ports = {str(p.get("containerPort")) for p in container.get("ports", [])}
        problems.require(annotations.get("prometheus.io/scrape") == "true", where,
                         "prometheus.io/scrape should be \"true\"")
        problems.require(annotations.get("prometheus.io/port") in ports, where,
                         "prometheus.io/port should be one of sluice's container ports")
        problems.require(annotations.get("prometheus.io/path") == "/metrics", where,
                         "prometheus.io/path should be /metrics")
        metrics_port = flags.get("--metrics-listen", ":").rsplit(":", 1)[1]
        problems.require(metrics_port == annotations.get("prometheus.io/port"), where,
                         "--metrics-listen port and prometheus.io/port differ")
        # The config file named by --config comes from a mounted ConfigMap key.
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        config = flags.get("--config", "")
        found = False
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            volume = volumes.get(mount["name"], {})
            if config.startswith(prefix) and "configMap" in volume:
                name = volume["configMap"]["name"]
                key = config[len(prefix):]
                found = problems.require(key in (configmaps.get(name) or {}).get("data", {}), where,
                                         f"ConfigMap {name} has no key {key}")
        problems.require(found, where, f"--config {config} is not a mounted ConfigMap key")
        # Every secret reference resolves to the example Secret.
        for each in pod["spec"].get("initContainers", []) + pod["spec"].get("containers", []):
            for var in each.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = secrets.get(ref["name"])
                    problems.require(secret and ref["key"] in secret.get("stringData", {}), where,
                                     f"{each['name']}: {var['name']} refers to a missing "
                                     f"secret key {ref['name']}/{ref['key']}")
                if var.get("name") == "OPENAI_BASE_URL" and each is not container:
                    problems.require(var.get("value") == f"http://127.0.0.1:{listen_port}/v1", where,
                                     f"{each['name']}: OPENAI_BASE_URL should reach sluice on "
                                     f"http://127.0.0.1:{listen_port}/v1")


# --- Prometheus and Grafana --------------------------------------------------------------

SERIES = re.compile(r"\b(sluice_[a-z0-9_]+)\b(\s*\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")


def check_expression(expr, where, problems, names):
    used = SERIES.findall(expr)
    problems.require(used, where, f"uses no sluice metric: {expr}")
    for name, _, selector in used:
        if not problems.require(name in names, where, f"{name} is not in the metrics contract"):
            continue
        for label, _ in MATCHER.findall(selector or ""):
            problems.require(label in names[name], where, f"{name} has no label {label}")


def check_dashboard(problems):
    where = rel(DASHBOARD)
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        problems(where, f"cannot parse: {err}")
        return
    names = contract()
    problems.require(dashboard.get("uid") and dashboard.get("title"), where, "needs uid and title")
    problems.require(isinstance(dashboard.get("schemaVersion"), int), where, "needs schemaVersion")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    for name in ("datasource", "org", "model"):
        problems.require(name in variables, where, f"no template variable {name}")
    for name in ("org", "model"):
        query = (variables.get(name) or {}).get("query") or {}
        query = query.get("query", "") if isinstance(query, dict) else query
        if problems.require("label_values(" in query, where, f"${name} should use label_values"):
            check_expression(query, f"{where}: ${name}", problems, names)
    ids = set()
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    problems.require(panels, where, "no panels")
    for panel in dashboard.get("panels", []):
        at = f"{where}: panel {panel.get('title')!r}"
        problems.require(panel.get("id") not in ids, at, "duplicate panel id")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        problems.require((panel.get("datasource") or {}).get("uid") == "${datasource}", at,
                         "datasource should be ${datasource}")
        problems.require(panel.get("targets"), at, "no queries")
        for target in panel.get("targets", []):
            check_expression(target.get("expr", ""), at, problems, names)


def check_prometheus(problems):
    where = rel(ALERTS)
    names = contract()
    for doc in load_yaml_documents(ALERTS, problems):
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                at = f"{where}: {rule.get('alert') or rule.get('record')}"
                check_expression(rule.get("expr", ""), at, problems, names)
                if "alert" in rule:
                    problems.require((rule.get("labels") or {}).get("severity"), at, "no severity")
                    for key in ("summary", "description"):
                        problems.require((rule.get("annotations") or {}).get(key), at, f"no {key}")
    config_path = DEPLOY / "prometheus" / "prometheus.yml"
    for doc in load_yaml_documents(config_path, problems):
        for rule_file in doc.get("rule_files", []):
            problems.require((config_path.parent / rule_file).is_file(), rel(config_path),
                             f"rule file {rule_file} missing")
    provisioning = DEPLOY / "grafana" / "provisioning"
    for path in sorted(provisioning.rglob("*.yml")):
        for doc in load_yaml_documents(path, problems):
            problems.require(doc.get("apiVersion") == 1, rel(path), "apiVersion should be 1")


# --- the binary --------------------------------------------------------------------------

PLACEHOLDER = "deploy-check-placeholder"
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value):
    """Compose's ${VAR:-default} gives its default, ${VAR:?error} and ${VAR} a placeholder of
    its own (distinct secrets stay distinct: sluice refuses a client token equal to a provider
    key): the check must not depend on the caller's environment."""
    def one(match):
        return match.group(3) if match.group(2) in (":-", "-") else f"{PLACEHOLDER}-{match.group(1).lower()}"
    return INTERPOLATION.sub(one, str(value))


def clean_environment():
    """The caller's environment without anything that configures sluice or holds a key."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SLUICE_") and not k.startswith("OPENAI_")}


def run(label, argv, env, expect, problems):
    shown = " ".join(shlex.quote(a) for a in argv)
    try:
        result = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        problems(label, f"{shown}: {err}")
        return
    if result.returncode in expect:
        print(f"  ok   {label}")
    else:
        detail = (result.stderr or result.stdout).strip().replace("\n", "\n         ")
        problems(label, f"exit {result.returncode} from {shown}\n         {detail}")
        print(f"  FAIL {label}")


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_binary(binary, problems):
    binary = str(Path(binary).resolve())
    if not Path(binary).is_file():
        problems(binary, "no such file: build it first (cargo build), or set SLUICE_BIN")
        return
    base = clean_environment()

    # The healthcheck subcommand: a closed port is 1, never 2 (clap's usage error).
    run("sluice healthcheck (closed port exits 1)",
        [binary, "healthcheck", "--url", f"http://127.0.0.1:{closed_port()}"], base, {1}, problems)

    # The image: its environment, its HEALTHCHECK. Against whatever is on the probed port here,
    # only the exit codes 0 and 1 mean the command itself is valid.
    stages = dockerfile_stages(dockerfile_instructions())
    final = list(stages.values())[-1]
    image = image_env(final)
    health = dict(final).get("HEALTHCHECK", "")
    command = json_array(health.partition("CMD")[2]) or ["", "healthcheck"]
    run("Dockerfile HEALTHCHECK command", [binary, *command[1:]], {**base, **image}, {0, 1},
        problems)

    # docker compose: the image's environment, then the service's, then its command.
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    sluice = compose["services"]["sluice"]
    env = {**base, **image, **{k: interpolate(v) for k, v in (sluice.get("environment") or {}).items()}}
    command = sluice.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else [interpolate(c) for c in command]
    run("compose: check-config deploy/compose/sluice.toml",
        [binary, *command, "check-config", str(DEPLOY / "compose" / "sluice.toml")], env, {0},
        problems)
    test = sluice["healthcheck"]["test"]
    run("compose: healthcheck command", [binary, *test[2:]], env, {0, 1}, problems)
    # The shared replicas: the same file with the store's URL from their environment.
    shared = yaml.safe_load(COMPOSE_SHARED.read_text(encoding="utf-8"))["services"]["sluice-2"]
    env = {**base, **image, **{k: interpolate(v) for k, v in (shared.get("environment") or {}).items()}}
    run("compose (shared): check-config deploy/compose/sluice.toml with SLUICE_REDIS_URL",
        [binary, "check-config", str(DEPLOY / "compose" / "sluice.toml")], env, {0}, problems)

    # Kubernetes: the ConfigMap's file, the container's args and environment, the probes.
    secrets, configmaps, deployments = {}, {}, []
    for _, doc in kubernetes_objects(problems):
        kind = doc.get("kind")
        if kind == "Secret":
            secrets[doc["metadata"]["name"]] = doc.get("stringData", {})
        elif kind == "ConfigMap":
            configmaps[doc["metadata"]["name"]] = doc.get("data", {})
        elif kind == "Deployment":
            deployments.append(doc)
    for deployment in deployments:
        container = sluice_container(deployment)
        if container is None:
            continue
        env = dict(base)
        for var in container.get("env", []):
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            env[var["name"]] = secrets.get(ref["name"], {}).get(ref["key"], PLACEHOLDER) if ref \
                else str(var.get("value", ""))
        args = container.get("args", [])
        flags = dict(zip(args[::2], args[1::2]))
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" not in volume or volume["name"] not in mounts:
                continue
            for key, text in configmaps.get(volume["configMap"]["name"], {}).items():
                if not key.endswith(".toml"):
                    continue
                path = f"{mounts[volume['name']].rstrip('/')}/{key}"
                with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                    f.write(text)
                try:
                    label = f"kubernetes: check-config {path} with the sidecar's args"
                    if path != flags.get("--config"):
                        label = f"kubernetes: check-config {path}"
                    run(label, [binary, *args, "check-config", f.name], env, {0}, problems)
                finally:
                    os.unlink(f.name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = ((container.get(probe) or {}).get("exec") or {}).get("command")
            if command:
                run(f"kubernetes: {probe} command", [binary, *command[1:]], env, {0, 1}, problems)


def main(argv):
    problems = Problems()
    if argv[1:2] == ["files"]:
        stages = check_dockerfile(problems)
        check_compose(problems, stages)
        check_compose_shared(problems)
        check_kubernetes(problems)
        check_dashboard(problems)
        check_prometheus(problems)
    elif argv[1:2] == ["binary"] and len(argv) == 3:
        check_binary(argv[2], problems)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for item in problems.items:
        print(f"  - {item}")
    return 1 if problems.items else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
