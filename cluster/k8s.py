"""Read a Kubernetes cluster for v4ray: its GPU pools (the planner's input) and a RayService's status.

Uses the `kubernetes` client against whatever API server the kubeconfig (or the in-cluster service account)
names; callers may pass their own `ApiClient`. Only reads: `list nodes` and `get rayservices.ray.io`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from v4ray.cluster.planner import PlanInput

GPU_RESOURCE = "nvidia.com/gpu"
# GPU feature discovery labels (NVIDIA GPU operator): the product, and the memory of one GPU in MiB.
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """An ApiClient from a kubeconfig (default ~/.kube/config), or the in-cluster service account."""
    from kubernetes import client, config

    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except config.ConfigException:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


@dataclass
class GpuPool:
    """Schedulable GPU nodes sharing one value of the grouping label."""

    label: str                       # the grouping label's value (e.g. NVIDIA-H200)
    nodes: list[str] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)   # allocatable GPUs per node, same order as nodes
    gpu_mem_mib: int | None = None   # from the memory label, when every node agrees

    @property
    def gpus_per_node(self) -> int:
        """The most common per-node GPU count (nodes with fewer are not counted as whole nodes)."""
        return Counter(self.gpus).most_common(1)[0][0]

    @property
    def whole_nodes(self) -> int:
        return sum(1 for g in self.gpus if g >= self.gpus_per_node)

    @property
    def total_gpus(self) -> int:
        return sum(self.gpus)

    def plan_input(self, gpu_mem_gib: float | None = None, nodes: int | None = None, **kw) -> PlanInput:
        """The planner's input for this pool; `gpu_mem_gib` overrides (or replaces a missing) memory label."""
        mem = gpu_mem_gib if gpu_mem_gib is not None else (self.gpu_mem_mib / 1024 if self.gpu_mem_mib else None)
        if mem is None:
            raise ValueError(f"GPU pool {self.label!r}: its nodes carry no {MEMORY_LABEL} label; pass gpu_mem_gib")
        return PlanInput(gpu_mem_gib=mem, gpus_per_node=self.gpus_per_node,
                         nodes=nodes if nodes is not None else self.whole_nodes, **kw)


def _ready(node) -> bool:
    conds = (node.status.conditions or []) if node.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def gpu_pools(api=None, label_key: str = PRODUCT_LABEL, selector: str | None = None) -> dict[str, GpuPool]:
    """GPU pools by the value of `label_key`: Ready, schedulable nodes with allocatable `nvidia.com/gpu` > 0."""
    from kubernetes import client

    core = client.CoreV1Api(api or api_client())
    pools: dict[str, GpuPool] = {}
    mems: dict[str, set] = {}
    for node in core.list_node(label_selector=selector).items:
        alloc = (node.status.allocatable or {}) if node.status else {}
        gpus = int(alloc.get(GPU_RESOURCE, "0") or 0)
        if gpus <= 0 or (node.spec and node.spec.unschedulable) or not _ready(node):
            continue
        labels = node.metadata.labels or {}
        key = labels.get(label_key, "<unlabelled>")
        pool = pools.setdefault(key, GpuPool(key))
        pool.nodes.append(node.metadata.name)
        pool.gpus.append(gpus)
        mems.setdefault(key, set()).add(labels.get(MEMORY_LABEL))
    for key, pool in pools.items():
        vals = mems[key]
        if len(vals) == 1 and None not in vals:
            pool.gpu_mem_mib = int(next(iter(vals)))
    return pools


@dataclass
class RayServiceStatus:
    name: str
    namespace: str
    service_status: str                          # KubeRay's serviceStatus ("Running", ...) or ""
    ready: bool                                  # the Ready condition
    message: str
    applications: dict[str, str]                 # app -> status
    deployments: dict[str, str]                  # app/deployment -> status
    serve_endpoints: int
    ray_cluster: str
    workers_ready: int
    workers_desired: int

    def summary(self) -> str:
        apps = ", ".join(f"{a}={s}" for a, s in self.applications.items()) or "none"
        return (f"RayService {self.namespace}/{self.name}: {'ready' if self.ready else 'not ready'}"
                f"{' (' + self.service_status + ')' if self.service_status else ''}; applications: {apps}; "
                f"serve endpoints {self.serve_endpoints}; cluster {self.ray_cluster or '-'} workers "
                f"{self.workers_ready}/{self.workers_desired}" + (f"; {self.message}" if self.message else ""))


def rayservice_status(name: str, namespace: str = "default", api=None) -> RayServiceStatus:
    """The status of one RayService (ray.io/v1); raises LookupError if it does not exist."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    co = client.CustomObjectsApi(api or api_client())
    try:
        obj = co.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)
    except ApiException as e:
        if e.status == 404:
            raise LookupError(f"RayService {namespace}/{name} not found") from None
        raise
    st = obj.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    ready = conds.get("Ready", {}).get("status") == "True"
    active = st.get("activeServiceStatus") or {}
    apps, deps = {}, {}
    for app, a in (active.get("applicationStatuses") or {}).items():
        apps[app] = a.get("status", "")
        for dep, d in (a.get("serveDeploymentStatuses") or {}).items():
            deps[f"{app}/{dep}"] = d.get("status", "")
    rc = active.get("rayClusterStatus") or {}
    msg = conds.get("Ready", {}).get("message", "") if not ready else ""
    return RayServiceStatus(name, namespace, st.get("serviceStatus", ""), ready, msg, apps, deps,
                            int(st.get("numServeEndpoints") or 0), active.get("rayClusterName", ""),
                            int(rc.get("readyWorkerReplicas") or rc.get("availableWorkerReplicas") or 0),
                            int(rc.get("desiredWorkerReplicas") or 0))
