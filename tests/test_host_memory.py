"""The host allocator under CPU steps (engine/host_memory.py): a step's freed memory serves the next step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A fresh process (glibc's thresholds are per process and set once): 20 "steps", each allocating and touching
# 108 MiB in 4-48 MiB tensors and freeing them, as a CPU prefill does with its activations; the page faults of the
# last five steps are counted. glibc's defaults serve a block over 32 MiB (its highest dynamic threshold) with its
# own mmap whatever came before, so the control faults every step; smaller blocks fault or not with its history.
STEPS = r"""
import json, resource, torch
from v4ray.engine.host_memory import keep_freed_memory

applied = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
late = []
for i in range(20):
    f0 = faults()
    xs = [torch.ones(n << 18) for n in (48, 40, 4, 16)]
    del xs
    if i >= 15:
        late.append(faults() - f0)
print(json.dumps({"applied": applied, "late_faults": late}))
"""


def _run(choice: str) -> dict:
    env = {**os.environ, "V4RAY_HOST_ALLOCATOR": choice}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_a_steps_freed_memory_serves_the_next_step_without_page_faults():
    """glibc's defaults hand such steps' large blocks back to the kernel and fault them in again; with
    `keep_freed_memory` the later steps fault none. The system run is the control: it shows the pattern does fault
    where the thresholds are glibc's."""
    kept, system = _run("keep"), _run("system")
    assert kept["applied"] and not system["applied"]
    assert min(system["late_faults"]) >= 22000, system   # the control: 88 MiB (48 + 40) faulted in again each step
    assert sum(kept["late_faults"]) <= 2048, kept         # (<= 8 MiB of pages over five steps, for slack)


def test_a_misspelt_choice_names_the_variable_and_the_choices(monkeypatch):
    from v4ray.engine import host_memory

    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("V4RAY_HOST_ALLOCATOR", "tcmalloc")
    with pytest.raises(ValueError, match="V4RAY_HOST_ALLOCATOR must be 'keep' or 'system'"):
        host_memory.keep_freed_memory()


# A fresh process (the freeze is once per process): an engine's runner on a tiny checkpoint, then a cycle of objects
# made after it, both dropped; a full collection reclaims the later cycle and not the start-up's objects.
FREEZE = r"""
import gc, json, sys, weakref, torch
from v4ray.engine.runner import ModelRunner
from v4ray.model.loader import load_model

runner = ModelRunner(load_model(sys.argv[1], torch.float32), 16 << 20, 16, decode_step="eager")
startup = gc.get_freeze_count()
tracked = any(o is runner for o in gc.get_objects())
class Node: pass
later = Node(); later.me = later; probe = weakref.ref(later)
del later
gc.collect()
print(json.dumps({"startup": startup, "runner_tracked": tracked, "later_collected": probe() is None}))
"""


@pytest.mark.timeout(240)
def test_the_engines_start_up_objects_leave_the_collectors_walk(tiny_ckpt):
    """`freeze_startup_objects`, called by ModelRunner: the objects alive when the first engine is ready (the runner
    itself among them) sit in the collector's permanent generation, which no collection walks; cyclic garbage made
    later is still collected."""
    out = subprocess.run([sys.executable, "-c", FREEZE, str(tiny_ckpt("v4-tiny"))], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["startup"] > 10000 and not got["runner_tracked"] and got["later_collected"], got
