"""Every Triton kernel compiles ahead of time for sm_90a and sm_100a, clean, with no GPU (kernels/aot.py).

The compiles run in a subprocess without TRITON_INTERPRET (kernels decorated for the interpreter cannot be compiled)
over `aot.ci_subset`: one configuration per kernel and dtype at V4-Flash shapes (decode and prefill tiles for the
expert GEMMs), both targets, about 40 s on 2 cores. `python bench/kernels.py --aot` compiles every configuration
at V4-Flash and V4-Pro shapes. What the wrappers launch is what is compiled: `aot.recording()` captures their
launches, so block sizes are not restated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v4ray.kernels import aot

REPO = Path(__file__).resolve().parents[1]
AOT_TIMEOUT_S = 600       # the subset takes ~40 s on 2 idle cores; leave room for a loaded CI machine
KERNELS = {"moe_gate_up", "moe_down", "sink_attention", "indexer_scores", "compress_pool", "mhc_mix", "mhc_sinkhorn"}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                          timeout=AOT_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if line.startswith("AOT_SKIP "):
            pytest.skip(f"cannot compile Triton kernels ahead of time here: {line[len('AOT_SKIP '):]}")
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = _run(["-m", "v4ray.kernels.aot"])
    rows = [json.loads(line[len("AOT_ROW "):]) for line in out.splitlines() if line.startswith("AOT_ROW ")]
    assert rows, f"kernels/aot.py compiled nothing:\n{out[-3000:]}"
    for r in rows:
        print(f"{r['kernel']:15s} {r['target']:8s} {r['config'][:48]:48s} regs={r.get('regs')} "
              f"spill={r.get('spill_stores')} shared={r.get('shared')} tc={r.get('tensor_cores')}")
    return rows


@pytest.mark.timeout(AOT_TIMEOUT_S + 60)
def test_every_kernel_compiles_clean(rows):
    """Compiles, zero spills, shared memory <= 227 KiB, tensor-core instructions for bf16 dots."""
    bad = [f"{r['kernel']} {r['config']} {r['target']} [{r['settings']}]: {'; '.join(r['problems'])}"
           for r in rows if r["problems"]]
    assert not bad, "kernels that do not compile clean:\n" + "\n".join(bad)


@pytest.mark.timeout(AOT_TIMEOUT_S + 60)
def test_subset_covers_every_kernel_on_both_targets(rows):
    seen = {(r["kernel"], r["target"]) for r in rows}
    missing = {(k, t) for k in KERNELS for t in aot.TARGETS} - seen
    assert not missing, f"not compiled: {sorted(missing)}"
    configs = {r["config"] for r in rows}
    for wanted in ("fp8 kv", "fp8 keys", "fp8 w", "fp4 w", "fp32 x"):
        assert any(wanted in c for c in configs), f"no {wanted!r} configuration in the CI subset"


@pytest.mark.timeout(AOT_TIMEOUT_S + 60)
def test_decode_moe_tiles_use_tensor_cores(rows):
    decode = [r for r in rows if r["family"] == "moe" and r["decode"] and r["tensor_cores_required"]]
    assert {r["target"] for r in decode} == set(aot.TARGETS)
    assert {r["kernel"] for r in decode} == {"moe_gate_up", "moe_down"}
    for r in decode:
        assert "BLOCK_M=16" in r["settings"], f"decode is not the 16-row tile: {r['settings']}"
        assert r["tensor_cores"], f"{r['kernel']} {r['config']} {r['target']}: no mma/wgmma/tcgen05 in the PTX"


@pytest.mark.timeout(AOT_TIMEOUT_S + 60)
def test_spill_check_catches_the_old_moe_launch():
    """The check can fail: gate_up at its former settings (4 warps, 128-deep k-step) spills, as the issue measured."""
    code = (
        "import json\n"
        "from v4ray.kernels import aot\n"
        "reason = aot.unavailable()\n"
        "if reason: print('AOT_SKIP ' + reason); raise SystemExit\n"
        "case = next(c for c in aot.cases(('flash',), ('moe',)) if c.decode and c.config.startswith('bf16 w'))\n"
        "gate_up = next(l for l in case.launches() if l.name == 'moe_gate_up')\n"
        "gate_up.kwargs.update(num_warps=4, BLOCK_K=128)\n"
        "print('OLD ' + json.dumps(aot.compile_launch(gate_up, 'sm_90a')))\n")
    out = _run(["-c", code])
    row = json.loads(next(line for line in out.splitlines() if line.startswith("OLD "))[4:])
    problems = aot.problems(row)
    assert any(p.startswith("spills") for p in problems), f"expected spills at the old settings, got {row}"


# ---- in-process: no compiles -------------------------------------------------------------------------------------

def test_every_kernel_has_an_aot_case():
    """Each @triton.jit kernel in kernels/ is launched by some case (a new kernel needs its shapes in aot.py)."""
    import importlib

    defined = set()
    for mod in ("moe", "attention", "indexer", "compressor", "mhc", "quant"):
        m = importlib.import_module(f"v4ray.kernels.{mod}")
        defined |= {name.strip("_").removesuffix("_kernel") for name, obj in vars(m).items()
                    if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    launched = {launch.name for case in aot.cases(("flash",)) for launch in case.launches()}
    assert defined == KERNELS, f"kernels defined: {sorted(defined)}; update KERNELS and aot.FAMILIES"
    assert defined <= launched, f"kernels no AOT case launches: {sorted(defined - launched)}"


def test_recording_captures_the_wrappers_settings():
    """What is compiled is what the wrapper launches: its block sizes and warps from its one settings function."""
    import torch

    from v4ray.kernels.moe import moe_launch_settings

    case = next(c for c in aot.cases(("flash",), ("moe",)) if c.decode and c.config.startswith("bf16 w"))
    launches = case.launches()
    assert [launch.name for launch in launches] == ["moe_gate_up", "moe_down"]
    m = aot.MODEL_SHAPES["flash"]
    rows_per_expert = aot.DECODE_BATCH * m["topk_experts"] / m["experts"]
    for launch in launches:
        for key, value in moe_launch_settings(rows_per_expert, torch.bfloat16).items():
            assert launch.kwargs[key] == value, (launch.name, key)


def test_model_shapes_match_the_presets():
    for model, shapes in aot.MODEL_SHAPES.items():
        cfg = json.loads((REPO / "model" / "presets" / f"deepseek-v4-{model}.json").read_text())
        expect = dict(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"], head_dim=cfg["head_dim"],
                      rope_dim=cfg["qk_rope_head_dim"], inter=cfg["moe_intermediate_size"],
                      experts=cfg["n_routed_experts"], topk_experts=cfg["num_experts_per_tok"],
                      index_heads=cfg["index_n_heads"], index_dim=cfg["index_head_dim"], index_topk=cfg["index_topk"],
                      hc=cfg["hc_mult"], sinkhorn=cfg["hc_sinkhorn_iters"], window=cfg["sliding_window"])
        assert shapes == expect, f"aot.MODEL_SHAPES[{model!r}] differs from the preset"
