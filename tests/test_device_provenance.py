"""Where tensors would live on a GPU, proven on the CPU (docs/architecture.md §11; tests/device_provenance.py).

The model's weights are tagged device-resident and an EngineCore runs prefill and decode steps under the
provenance mode: no op may mix host and device tensors, each step uploads its metadata once, and a decode step
reads back one result. A planted `torch.tensor(list)` in the forward is caught.
"""

from __future__ import annotations

import pytest
import torch

from v4ray.engine.core import EngineCore
from v4ray.engine.runner import ModelRunner
from v4ray.engine.sampling import SamplingParams
from v4ray.model.kv_cache import StepBatch
from v4ray.model.loader import load_model
from v4ray.model.tokenizer import V4Tokenizer

from conftest import parity_prompt
from device_provenance import DeviceTensor, Provenance, kernels_as_device_ops, mark_device

NUM_SEQS = 8
DECODE_STEPS = 4
MAX_UPLOADS_PER_STEP = 1     # the step's packed metadata (StepBatch.prepare)
MAX_SYNCS_PER_DECODE_STEP = 1  # the sampled tokens (and their logprobs), read back together

SAMPLING = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_p=0.9, top_k=20, seed=7),
    "logprobs": dict(temperature=0.0, logprobs=5),
}


def _run(ckpt, params: SamplingParams, kv_format: str | None = None, prompt_len: int = 150,
         decode_step: str = "eager"):
    """Prefill 8 prompts (of different lengths, crossing CSA and HCA windows) and decode; -> per-step windows."""
    with Provenance() as prov, kernels_as_device_ops(prov):
        model = mark_device(load_model(ckpt, torch.float32))
        runner = ModelRunner(model, 64 << 20, NUM_SEQS, kv_format=kv_format, decode_step=decode_step)
        assert (runner.graphs is not None) == (decode_step != "eager")
        assert isinstance(runner.cache.layers[0].swa, DeviceTensor)  # the cache follows the model's device
        core = EngineCore(runner, V4Tokenizer.from_dir(ckpt), 4096, 4096, NUM_SEQS)
        for i in range(NUM_SEQS):
            core.add_request(f"r{i}", parity_prompt(prompt_len + 7 * i, seed=i).tolist(), params)
        steps, outputs = [], []
        while core.has_work() and len(steps) < 1 + DECODE_STEPS:
            with prov.window(f"step {len(steps)}") as w:
                outputs += core.step()
            steps.append(w)
    # Every step ran for real: a failing forward ends its requests with an error instead of raising.
    assert outputs and not [o.error for o in outputs if o.error], [o.error for o in outputs if o.error][:1]
    assert {len(o.outputs[0].token_ids) for o in outputs[-NUM_SEQS:]} == {1 + DECODE_STEPS}  # prefill samples one
    return steps


@pytest.mark.parametrize("decode_step", ["eager", "static"])
@pytest.mark.parametrize("kind", list(SAMPLING))
def test_decode_and_prefill_steps_cross_the_device_boundary_once(tiny_ckpt, kind, decode_step):
    """static: the fixed-shape decode step (what is compiled or captured as a CUDA graph): its inputs are one
    copy into the bucket's persistent buffer, and nothing inside its layers reads the device."""
    params = SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True, **SAMPLING[kind])
    prefill, *decode = _run(tiny_ckpt(), params, decode_step=decode_step)
    assert len(decode) == DECODE_STEPS
    for w in [prefill, *decode]:
        assert w.count("mix") == 0, f"{w.name}: host tensors reach device ops\n{w.summary()}"
        assert w.count("upload") <= MAX_UPLOADS_PER_STEP, f"{w.name}: uploads\n{w.summary()}"
    for w in decode:
        assert w.count("sync") == MAX_SYNCS_PER_DECODE_STEP, f"{w.name}: device->host reads\n{w.summary()}"


@pytest.mark.parametrize("decode_step", ["eager", "static"])
def test_fp8_cache_steps_stay_on_the_device(tiny_ckpt, decode_step):
    params = SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True)
    for w in _run(tiny_ckpt(), params, kv_format="fp8", decode_step=decode_step):
        assert w.count("mix") == 0 and w.count("upload") <= MAX_UPLOADS_PER_STEP, f"{w.name}\n{w.summary()}"


def test_a_planted_host_tensor_in_the_forward_is_caught(tiny_ckpt, monkeypatch):
    """The regression the test exists for: positions rebuilt from Python lists inside the step (what the forward
    did before StepBatch.prepare) reach device ops as host tensors."""
    def host_positions(self):
        return torch.tensor([p for seq, _, n in self.chunks for p in range(seq.num_tokens, seq.num_tokens + n)])

    monkeypatch.setattr(StepBatch, "positions", host_positions)
    steps = _run(tiny_ckpt(), SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True))
    assert all(w.count("mix") > 0 for w in steps), [w.count("mix") for w in steps]
    assert any("apply_rope" in e.where or "rope_cos_sin" in e.where for e in steps[-1].of("mix"))
