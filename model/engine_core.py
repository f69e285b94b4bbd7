"""EngineCore: requests in, tokens out, one step at a time — scheduler + model runner + sampling.

It runs wherever a model replica's attention side runs: in-process for the single-process engine, inside each
Router actor for a distributed replica. `step()` returns the progress of every request it touched.
"""

from __future__ import annotations

import itertools

import torch

from .outputs import RequestOutput
from .runner import ModelRunner
from .sampling import SamplingParams, make_generator
from .scheduler import ScheduledChunk, Scheduler, SeqState
from .sequence import Sequence, prompt_logprobs
from .tokenizer import V4Tokenizer


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.out = RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_ids,
                                 prompt_logprobs=None, finished=False)
        self.params = params
        self.states: list[SeqState] = []


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer: V4Tokenizer, max_model_len: int,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, prefix_caching: bool = False):
        self.runner, self.tokenizer, self.max_model_len = runner, tokenizer, max_model_len
        self.scheduler = Scheduler(runner, max_num_batched_tokens, max_num_seqs, prefix_caching)
        self.requests: dict[str, _Request] = {}
        self._arrival = itertools.count()
        self.num_steps = 0

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        if not self.runner.fits_ever(min(len(prompt_ids) + params.max_tokens, self.max_model_len)):
            raise ValueError(f"a sequence of {len(prompt_ids)} prompt tokens plus max_tokens={params.max_tokens} "
                             f"cannot fit in this replica's KV cache; lower max_tokens or raise the cache size")
        req = _Request(request_id, prompt, prompt_ids, params)
        generator = make_generator(params.seed)
        for i in range(params.n):
            seq = Sequence(i, prompt_ids, params, self.tokenizer, generator, self.max_model_len)
            state = SeqState(f"{request_id}#{i}", request_id, seq, next(self._arrival),
                             want_prompt_logits=(i == 0 and params.prompt_logprobs is not None))
            req.states.append(state)
            self.scheduler.add(state)
        self.requests[request_id] = req

    def abort(self, request_id: str) -> bool:
        """Drop a request: its sequences leave the queues and their cache is freed."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for s in req.states:
            self.scheduler.remove(s.key)
            self.runner.release(s.key)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns snapshots of requests that progressed."""
        plan = self.scheduler.schedule(self._admit, self._preempt, self._load_prefix)
        if not plan:
            return []
        logits = self.runner.step([(c.state.key, c.state.tokens[c.start:c.start + c.num_tokens], c.logit_rows)
                                   for c in plan])
        self.num_steps += 1
        # one batched log-softmax and argmax for every sampled row (per-row Python work stays small)
        logprobs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1).tolist()
        touched: dict[str, _Request] = {}
        at = 0
        for c in plan:
            n = len(c.logit_rows)
            self._advance(c, logits[at:at + n], logprobs[at + n - 1] if n else None, argmax[at + n - 1] if n else None)
            at += n
            req = self.requests.get(c.state.request_id)
            if req is not None:
                touched[req.out.request_id] = req
        return [self._snapshot(req) for req in touched.values()]

    def _advance(self, c: ScheduledChunk, rows: torch.Tensor, last_logprobs: torch.Tensor | None,
                 last_argmax: int | None) -> None:
        s = c.state
        prompt = s.seq.prompt_token_ids
        if s.want_prompt_logits and c.start < len(prompt):
            s.prompt_logits.append(rows)
        s.num_computed += c.num_tokens
        if s.store_at is not None and s.num_computed == s.store_at:
            self.runner.store_prefix(s.key, prompt[:s.store_at])
            s.store_at = None
        if not c.sample:
            return
        req = self.requests[s.request_id]
        if s.want_prompt_logits and s.num_computed >= len(prompt):
            req.out.prompt_logprobs = prompt_logprobs(torch.cat(s.prompt_logits)[:len(prompt)], prompt,
                                                      req.params.prompt_logprobs, self.tokenizer)
            s.want_prompt_logits, s.prompt_logits = False, []
        s.seq.step(rows[-1], last_logprobs, last_argmax if s.seq.plain_greedy else None)
        if s.seq.finished:
            self.scheduler.remove(s.key)
            self.runner.release(s.key)

    def _snapshot(self, req: _Request) -> RequestOutput:
        out = req.out
        out.outputs = [s.seq.output() for s in req.states]
        out.finished = all(s.seq.finished for s in req.states)
        if out.finished:
            self.requests.pop(out.request_id, None)
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, out.prompt_logprobs,
                             list(out.outputs), out.finished, out.num_cached_tokens)

    # ---- scheduler callbacks ----------------------------------------------------------------------------
    def _admit(self, s: SeqState, num_tokens: int) -> None:
        self.runner.admit(s.key, num_tokens)

    def _preempt(self, s: SeqState) -> None:
        self.runner.release(s.key)

    def _load_prefix(self, s: SeqState) -> int:
        n = self.runner.load_prefix(s.key, s.seq.prompt_token_ids)
        req = self.requests[s.request_id]
        if s.seq.index == 0 and s.num_preemptions == 0:
            req.out.num_cached_tokens = n
        return n

    def stats(self) -> dict:
        cache = self.runner.cache
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "requests": len(self.requests), "preemptions": self.scheduler.num_preemptions,
                "steps": self.num_steps, "kv_blocks": cache.blocks.num, "kv_free_blocks": cache.blocks.num_free,
                "kv_slots_free": cache.slots.num_free}
