"""cluster/k8s.py against a loopback fake of the few Kubernetes API calls it makes (no cluster exists here):
GET /api/v1/nodes and GET /apis/ray.io/v1/namespaces/{ns}/rayservices/{name}. The `kubernetes` client,
its HTTP stack and deserialisation are the real ones."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from v4ray.cluster.k8s import gpu_pools, rayservice_status
from v4ray.cluster.planner import plan_layout
from v4ray.model.config import load_preset


def node(name, gpus, product, mem_mib="143771", ready=True, unschedulable=False, extra_labels=None):
    labels = {"kubernetes.io/hostname": name, **({"nvidia.com/gpu.product": product} if product else {}),
              **({"nvidia.com/gpu.memory": mem_mib} if mem_mib else {}), **(extra_labels or {})}
    alloc = {"cpu": "96", "memory": "2Ti", **({"nvidia.com/gpu": str(gpus)} if gpus is not None else {})}
    return {"metadata": {"name": name, "labels": labels}, "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": alloc, "conditions": [{"type": "Ready", "status": str(ready)}]}}


NODES = [node("h200-a", 8, "NVIDIA-H200"), node("h200-b", 8, "NVIDIA-H200"),
         node("h200-c", 8, "NVIDIA-H200", ready=False), node("h200-d", 8, "NVIDIA-H200", unschedulable=True),
         node("l4-a", 4, "NVIDIA-L4", mem_mib="23034"), node("cpu-a", None, None, mem_mib=None)]

RAYSERVICE = {
    "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "v4", "namespace": "llm"},
    "status": {
        "serviceStatus": "Running", "numServeEndpoints": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "activeServiceStatus": {
            "rayClusterName": "v4-raycluster-abcde",
            "rayClusterStatus": {"readyWorkerReplicas": 2, "desiredWorkerReplicas": 2},
            "applicationStatuses": {"v4ray": {"status": "RUNNING", "serveDeploymentStatuses": {
                "OpenAIIngress": {"status": "HEALTHY"}, "V4Server": {"status": "HEALTHY"}}}}}}}


class FakeAPI(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        FakeAPI.requests.append(self.path)
        if url.path == "/api/v1/nodes":
            sel = parse_qs(url.query).get("labelSelector", [None])[0]
            items = NODES
            if sel:
                k, v = sel.split("=")
                items = [n for n in NODES if n["metadata"]["labels"].get(k) == v]
            return self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items})
        if url.path == "/apis/ray.io/v1/namespaces/llm/rayservices/v4":
            return self._send(200, RAYSERVICE)
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": f"{url.path} not found"})


@pytest.fixture(scope="module")
def api():
    from kubernetes import client

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
    with client.ApiClient(cfg) as c:
        yield c
    server.shutdown()
    server.server_close()


def test_gpu_pools_grouped_by_product_label(api):
    pools = gpu_pools(api)
    assert set(pools) == {"NVIDIA-H200", "NVIDIA-L4"}  # the CPU node, NotReady and cordoned nodes are left out
    h200 = pools["NVIDIA-H200"]
    assert h200.nodes == ["h200-a", "h200-b"] and h200.gpus_per_node == 8 and h200.whole_nodes == 2
    assert h200.gpu_mem_mib == 143771 and pools["NVIDIA-L4"].total_gpus == 4


def test_pool_feeds_the_planner(api):
    p = gpu_pools(api)["NVIDIA-H200"].plan_input(context=131072)
    assert (p.gpus_per_node, p.nodes, round(p.gpu_mem_gib, 1)) == (8, 2, 140.4)
    plan = plan_layout(load_preset("deepseek-v4-pro"), p)
    assert (plan["layout"]["routers"], plan["layout"]["expert_shards"]) == (8, 8)


def test_group_by_another_label_and_selector(api):
    pools = gpu_pools(api, label_key="kubernetes.io/hostname", selector="nvidia.com/gpu.product=NVIDIA-L4")
    assert list(pools) == ["l4-a"]
    assert any("labelSelector=nvidia.com" in r for r in FakeAPI.requests)


def test_rayservice_status(api):
    st = rayservice_status("v4", "llm", api)
    assert st.ready and st.service_status == "Running" and st.applications == {"v4ray": "RUNNING"}
    assert st.deployments["v4ray/V4Server"] == "HEALTHY" and (st.workers_ready, st.workers_desired) == (2, 2)
    assert "ready (Running)" in st.summary() and "v4ray=RUNNING" in st.summary()


def test_rayservice_missing(api):
    with pytest.raises(LookupError, match="llm/nope not found"):
        rayservice_status("nope", "llm", api)
