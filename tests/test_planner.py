"""`v4ray plan layout`: parameter and byte counts from the model's own tensor shapes, the layout and memory
arithmetic, refusals, Helm values. Counts are checked against docs/v4_model.md §1.3/§5.4 and against the tensors a
`make-tiny` checkpoint actually holds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from v4ray.serve.config import ServeConfig
from v4ray.cluster.planner import (GIB, LayoutError, PlanInput, count_params, helm_values, plan_layout,
                                   tensor_inventory, weight_bytes)
from v4ray.model.config import load_preset
from v4ray.model.kv_format import capacity, kv_bytes

REPO = Path(__file__).resolve().parents[1]
PRO_CI_VALUES = REPO / "helm" / "v4ray" / "ci" / "v4-pro-2x8-h200-values.yaml"
PRO_2X8 = PlanInput(gpu_mem_gib=140, gpus_per_node=8, nodes=2, context=131072)


@pytest.fixture(scope="module")
def flash():
    return load_preset("deepseek-v4-flash")


@pytest.fixture(scope="module")
def pro():
    return load_preset("deepseek-v4-pro")


def test_flash_counts_match_v4_model_md(flash):
    c = count_params(flash)
    assert round(c.total / 1e9, 1) == 284.3
    assert round(c.total_with_mtp / 1e9, 1) == 290.9
    assert round(c.active / 1e9, 2) == 13.27
    assert c.total == c.dense + c.routed + c.embedding + c.head
    assert c.routed == c.per_expert * 256 * 43


def test_pro_counts_match_v4_model_md(pro):
    c = count_params(pro)
    assert round(c.total_with_mtp / 1e9, 1) == 1598.8
    assert round(c.total / 1e12, 1) == 1.6
    assert round(c.active / 1e9, 2) == 48.85


@pytest.mark.parametrize("preset,per_expert", [("deepseek-v4-flash", 13_369_344), ("deepseek-v4-pro", 35_094_528)])
def test_expert_bytes_match_v4_model_md(preset, per_expert):
    """§5.4: one routed expert (w1, w2, w3) in FP4 e2m1 with one ue8m0 scale per 32 values."""
    cfg = load_preset(preset)
    wb = weight_bytes(cfg, "fp8-dense-fp4-experts")
    assert wb.per_expert_layer == per_expert
    # FP8 with 128x128 block scales doubles it (plus scale bytes); BF16 is 4x the FP4 payload.
    assert weight_bytes(cfg, "bf16").per_expert_layer == 3 * 2 * cfg.hidden_size * cfg.moe_intermediate_size


def test_folded_experts_equal_the_full_model_walk():
    """The planner builds V4Model with one expert per layer and multiplies; the full model gives the same."""
    from v4ray.model.v4 import V4Model

    cfg = load_preset("v4-tiny-pro")
    full = sum(b.numel() for b in V4Model(cfg).state_dict().values())
    assert count_params(cfg).total == full


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize("dtype,weights", [("bf16", "bf16"), ("fp8", "fp8"),
                                           ("fp4-experts", "fp8-dense-fp4-experts")])
def test_counts_equal_a_make_tiny_checkpoint(tiny_ckpt, dtype, weights):
    """Sum of tensor elements in the safetensors headers (packed FP4 holds 2 values per byte; scales are not
    parameters) equals the planner's count; stored bytes equal its byte count for that weight format."""
    cfg = load_preset("v4-tiny")
    ckpt = tiny_ckpt("v4-tiny", dtype)
    values = stored = 0
    names = set()
    for f in sorted(ckpt.glob("*.safetensors")):
        for name, meta in _safetensors_header(f).items():
            if name == "__metadata__":
                continue
            names.add(name)
            a, b = meta["data_offsets"]
            stored += b - a
            if name.endswith(".scale"):
                continue
            n = 1
            for s in meta["shape"]:
                n *= s
            values += 2 * n if (meta["dtype"] == "I8" and ".ffn.experts." in name) else n
    counts = count_params(cfg)
    assert values == counts.total
    assert stored == weight_bytes(cfg, weights).total
    expected = {t.name.replace(".experts.0.", ".experts.{e}.") for t in tensor_inventory(cfg, mtp=False)}
    got = {n for n in names if not n.endswith(".scale")}
    got = {n.split(".experts.")[0] + ".experts.{e}." + n.split(".experts.")[1].split(".", 1)[1]
           if ".ffn.experts." in n else n for n in got}
    assert got == expected


def test_mtp_block_per_v4_model_md(flash):
    """MTP = one SWA block with non-hash routing + e_proj/h_proj/enorm/hnorm/norm/hc_head_* (§5.2)."""
    mtp = [t for t in tensor_inventory(flash) if t.mtp]
    names = {t.name for t in mtp}
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
            "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale"} <= names
    assert "mtp.0.ffn.gate.bias" in names and not any("tid2eid" in n or "compressor" in n for n in names)


def test_pro_layout_on_two_8_gpu_nodes(pro):
    plan = plan_layout(pro, PRO_2X8)
    L, rg, sg, kv = plan["layout"], plan["router_gpu"], plan["shard_gpu"], plan["kv"]
    assert (L["routers"], L["expert_shards"], L["experts_per_shard"]) == (8, 8, 48)
    usable = int(140 * GIB * 0.9)
    assert rg["weights"] + rg["activation_reserve"] + rg["kv_pool"] == usable
    assert sg["weights"] == 48 * 61 * 35_094_528 and sg["weights"] + sg["activation_reserve"] <= usable
    cap = capacity(pro, rg["kv_pool"], "fp8", 131072)
    assert kv["sequences_per_router"] == cap.max_seqs > 0 and kv["tokens_total"] == 8 * cap.max_tokens
    assert kv["sequence_bytes"] == kv_bytes(pro, "fp8").sequence_bytes(131072)
    ServeConfig.model_validate(helm_values(plan, "/models/deepseek-v4-pro")["serve"]["args"])


def test_fewest_nodes_when_unspecified(pro):
    plan = plan_layout(pro, PlanInput(gpu_mem_gib=140, gpus_per_node=8))
    assert plan["pool"]["nodes"] == 1 and plan["layout"]["routers"] >= 1
    assert plan["layout"]["routers"] + plan["layout"]["expert_shards"] == 8


def test_refuses_pro_on_one_node_of_24_gib(pro):
    with pytest.raises(LayoutError) as e:
        plan_layout(pro, PlanInput(gpu_mem_gib=24, gpus_per_node=8, nodes=1))
    msg = str(e.value)
    assert "router cannot fit" in msg and "dense weights" in msg
    assert "at least" in msg and "expert shards" in msg and "leave at most 7" in msg


def test_cli_plan_layout(capsys, tmp_path):
    from v4ray.cli import main

    out = tmp_path / "values.yaml"
    assert main(["plan", "layout", "--model", "deepseek-v4-pro", "--gpu-mem-gib", "140", "--gpus-per-node", "8",
                 "--nodes", "2", "--emit-values", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 router(s) + 8 expert shard(s)" in text and "KV pool" in text
    assert yaml.safe_load(out.read_text())["serve"]["args"]["num_expert_shards"] == 8
    assert main(["plan", "layout", "--model", "deepseek-v4-pro", "--gpu-mem-gib", "24", "--gpus-per-node", "8",
                 "--nodes", "1"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_ci_values_are_the_planner_output(pro):
    """helm/v4ray/ci/v4-pro-2x8-h200-values.yaml is `plan layout --emit-values` output; regenerate if this fails."""
    plan = plan_layout(pro, PRO_2X8)
    assert yaml.safe_load(PRO_CI_VALUES.read_text()) == helm_values(plan, "/models/deepseek-v4-pro")


@pytest.mark.parametrize("kv", ["fp8", "bf16"])
def test_the_plan_deploys_the_kv_dtype_it_sized(flash, kv):
    """serve.args carry the KV format the pool was sized for (and one GPU per rank, on CUDA): a router that read
    kv_cache_bytes in another format would hold a different number of sequences than the plan promises."""
    plan = plan_layout(flash, PlanInput(gpu_mem_gib=140, gpus_per_node=8, kv_dtype=kv))
    args = ServeConfig.model_validate(helm_values(plan, "/models/flash")["serve"]["args"])
    assert (args.kv_cache_dtype, args.gpus_per_router, args.gpus_per_shard, args.device) == (kv, 1, 1, "cuda")
    assert capacity(flash, args.kv_cache_bytes, args.kv_cache_dtype, plan["context"]).max_seqs == \
        plan["kv"]["sequences_per_router"]
    other = {"fp8": "bf16", "bf16": "fp8"}[kv]
    assert capacity(flash, args.kv_cache_bytes, other, plan["context"]).max_seqs != plan["kv"]["sequences_per_router"]


def test_pods_and_strategy_follow_the_placement_rule(flash, pro):
    """A replica that fits one node is one pod, placed PACK; a larger one is router and shard pods, SPREAD — the
    rule Ray's placement applies (choose_strategy) on the pods the chart makes."""
    from v4ray.cluster.planner import pod_placement

    one = plan_layout(flash, PlanInput(gpu_mem_gib=140, gpus_per_node=8))["layout"]
    assert (one["routers"], one["expert_shards"], one["colocated"], one["placement_strategy"]) == (6, 2, True, "PACK")
    assert one["router_pods"] == {"replicas": 1, "gpus_per_pod": 8} and one["expert_pods"]["replicas"] == 0
    two = plan_layout(pro, PRO_2X8)["layout"]
    assert (two["colocated"], two["placement_strategy"]) == (False, "SPREAD")
    assert two["router_pods"] == two["expert_pods"] == {"replicas": 1, "gpus_per_pod": 8}
    assert pod_placement(16, 16, 8)["router_pods"] == {"replicas": 2, "gpus_per_pod": 8}


def test_default_values_are_the_flash_plan(flash):
    """helm/v4ray/values.yaml's serve.args and workers are `plan layout` for Flash on one 8 x 140 GiB node."""
    values = yaml.safe_load((REPO / "helm" / "v4ray" / "values.yaml").read_text())
    planned = helm_values(plan_layout(flash, PlanInput(gpu_mem_gib=140, gpus_per_node=8)), "/models/deepseek-v4-flash")
    assert values["serve"]["args"] == planned["serve"]["args"]
    assert {g: {"replicas": values["workers"][g]["replicas"]} for g in planned["workers"]} == planned["workers"]
