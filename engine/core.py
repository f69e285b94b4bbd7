"""EngineCore: requests in, tokens out, one step at a time — scheduler + model runner + sampling.

It runs wherever a model replica's attention side runs: in-process for the single-process engine, inside each
Router actor for a distributed replica. `step()` returns the progress of every request it touched.
"""

from __future__ import annotations

import itertools
import logging

import torch

from .grammar import GrammarBackend
from .outputs import RequestOutput
from .runner import ModelRunner
from .sampler import Penalties, SampledToken, SamplingBatch, make_generator, picked_tokens, sampling_row
from .sampling import RequestOutputKind, SamplingParamError, SamplingParams
from .scheduler import ScheduledChunk, Scheduler, SeqState
from .sequence import Sequence, prompt_logprobs
from v4ray.model.tokenizer import V4Tokenizer

log = logging.getLogger(__name__)


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.out = RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_ids,
                                 prompt_logprobs=None, finished=False)
        self.params = params
        self.states: list[SeqState] = []
        self.emitted = False  # a DELTA output was sent
        self.prompt_targets: torch.Tensor | None = None  # prompt ids [1:] on the device, for prompt_logprobs


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer: V4Tokenizer, max_model_len: int,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64, prefix_caching: bool = False,
                 lockstep: bool = False, config=None, max_step_rows: int = 0):
        """lockstep: this engine is one rank of a distributed replica. A failed forward then leaves the
        collectives out of step, so it fails the replica (raises) instead of only the requests of that step.
        config: the EngineConfig it was built from (`build_engine_core`), for stats and checks."""
        self.runner, self.tokenizer, self.max_model_len = runner, tokenizer, max_model_len
        self.lockstep, self.config = lockstep, config
        self.scheduler = Scheduler(runner, max_num_batched_tokens, max_num_seqs, prefix_caching, max_step_rows)
        self.device = runner.model.device  # where the logits are, so where sampling runs
        self.requests: dict[str, _Request] = {}
        self._arrival = itertools.count()
        self.num_steps = 0
        self._grammars: GrammarBackend | None = None  # made at the first structured request

    @property
    def grammars(self) -> GrammarBackend:
        if self._grammars is None:
            self._grammars = GrammarBackend(self.tokenizer.to_json(), self.runner.model.cfg.vocab_size,
                                            self.tokenizer.eos_token_id, parallel=self.device.type != "cpu")
        return self._grammars

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        vocab = self.tokenizer.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise SamplingParamError("prompt", f"prompt token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingParamError("logit_bias", f"logit_bias token ids must be below the vocabulary size {vocab}")
        if not self.runner.fits_ever(min(len(prompt_ids) + params.max_tokens, self.max_model_len)):
            raise ValueError(f"a sequence of {len(prompt_ids)} prompt tokens plus max_tokens={params.max_tokens} "
                             f"cannot fit in this replica's KV cache; lower max_tokens or raise the cache size")
        req = _Request(request_id, prompt, prompt_ids, params)
        # Everything sampling will need on the device is uploaded now, outside any step.
        generator = make_generator(params.seed, self.device)
        if params.prompt_logprobs is not None and len(prompt_ids) > 1:
            req.prompt_targets = torch.tensor(prompt_ids[1:], dtype=torch.long).to(self.device)
        vocab_size = self.runner.model.cfg.vocab_size
        param_row = sampling_row(params, vocab_size).to(self.device)  # [7], stacked with the step's other rows
        grammar = self.grammars.matcher(params.structured) if params.structured is not None else None
        for i in range(params.n):
            penalties = Penalties.of(params, prompt_ids, vocab_size, self.tokenizer.eos_token_id, self.device)
            seq = Sequence(i, prompt_ids, params, self.tokenizer, generator, self.max_model_len, penalties,
                           param_row, grammar if i == 0 or grammar is None else grammar.deep_copy())
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
        """Schedule, run the model once, sample; returns the outputs of requests that progressed, each in its
        `output_kind`. A failure that belongs to one request (its sampling or bookkeeping raised) fails only that
        request: it is dropped and its output carries `error`."""
        plan = self.scheduler.schedule(self._admit, self._preempt, self._load_prefix)
        if not plan:
            return []
        try:
            logits = self.runner.step([(c.state.key, c.state.token_ids(c.start, c.num_tokens), c.logit_rows)
                                       for c in plan])
        except Exception as e:
            if self.lockstep:
                raise
            # One process: the cache rows of this step's sequences are suspect, the engine is not.
            log.exception("model step failed; failing the %d requests of this step", len(plan))
            msg = f"model step failed: {type(e).__name__}: {e}"
            return [self._fail(rid, msg) for rid in dict.fromkeys(c.state.request_id for c in plan)
                    if rid in self.requests]
        self.num_steps += 1
        failed: dict[str, str] = {}
        touched: dict[str, _Request] = {}
        sampled: list[tuple[SeqState, int]] = []  # sequences to sample and their logits row
        at = 0
        for c in plan:
            n = len(c.logit_rows)
            rid = c.state.request_id
            if rid in self.requests:  # else it failed earlier in this step
                try:
                    self._advance(c, logits[at:at + n])
                    touched[rid] = self.requests[rid]
                    if c.sample:
                        sampled.append((c.state, at + n - 1))
                except Exception as e:  # noqa: BLE001 - isolate the request that raised
                    self._isolate(rid, e, failed, touched)
            at += n
        if sampled:
            self._sample(logits, sampled, failed, touched)
        outs = [self._output(req) for req in touched.values()]
        outs += [self._failed_output(rid, msg) for rid, msg in failed.items()]
        return [o for o in outs if o is not None]

    def _sample(self, logits: torch.Tensor, sampled: list[tuple[SeqState, int]], failed: dict[str, str],
                touched: dict[str, "_Request"]) -> None:
        """Sample every sequence of the step together on the logits' device, read the tokens back with ONE
        transfer (their logprobs in it when asked), then do each sequence's Python bookkeeping. A request whose
        sampling raises — now, or when its row's probabilities turn out invalid — fails alone; the other rows'
        tokens do not depend on it."""
        rows = [row for _, row in sampled]
        every_row = rows == list(range(logits.shape[0]))
        picks = self.runner.greedy_picks
        if (picks is not None and every_row
                and all(s.seq.plain_greedy and s.seq.params.logprobs is None for s, _ in sampled)):
            # a decode step of plain greedy rows: the step's graph chose them already (`greedy_picks`)
            self._take(sampled, picked_tokens(picks), set(), failed, touched)
            return
        batch = SamplingBatch(logits if every_row else torch.stack([logits[row] for row in rows]))  # [S, V]
        for i, (s, _) in enumerate(sampled):
            if s.request_id in self.requests:
                try:
                    s.seq.sample(batch, i)
                except Exception as e:  # noqa: BLE001
                    self._isolate(s.request_id, e, failed, touched)
        constrained = [] if self._grammars is None else [  # no structured request yet: nothing to look at
            (s.seq.grammar, i) for i, (s, _) in enumerate(sampled)
            if s.request_id in self.requests and s.seq.constrained]
        if constrained:  # every grammar's mask at once, one upload
            batch.constrain(self.grammars.fill(constrained, len(sampled)).to(self.device, non_blocking=True))
        asked = [s.seq.params.logprobs for s, _ in sampled
                 if s.request_id in self.requests and s.seq.params.logprobs is not None]
        results = batch.run(max(asked) if asked else None)  # the step's one device->host transfer
        refused = set()
        if constrained:
            ok = self.grammars.advance([m for m, _ in constrained], [results[i].token for _, i in constrained])
            refused = {i for (_, i), good in zip(constrained, ok) if not good and not results[i].error}
        self._take(sampled, results, refused, failed, touched)

    def _take(self, sampled: list[tuple[SeqState, int]], results: list[SampledToken], refused: set[int],
              failed: dict[str, str], touched: dict[str, "_Request"]) -> None:
        """Each sampled sequence takes its token (the rows in `refused` fail: their grammar refused it)."""
        for i, ((s, _), result) in enumerate(zip(sampled, results)):
            if s.request_id not in self.requests:
                continue
            if i in refused:
                self._isolate(s.request_id, RuntimeError(f"the grammar refused token {result.token}: "
                                                         f"{s.seq.grammar.get_error()[:300]}"), failed, touched)
                continue
            try:
                s.seq.append(result)
                if s.seq.finished:
                    self.scheduler.remove(s.key)
                    self.runner.release(s.key)
            except Exception as e:  # noqa: BLE001
                self._isolate(s.request_id, e, failed, touched)

    def _isolate(self, request_id: str, error: Exception, failed: dict[str, str], touched: dict) -> None:
        """Fail one request of the step: it is dropped and its output carries the error."""
        log.error("request %s failed in sampling", request_id, exc_info=error)
        failed[request_id] = f"{type(error).__name__}: {error}"
        touched.pop(request_id, None)
        self.abort(request_id)

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        self.abort(request_id)
        return self._failed_output(request_id, message)

    @staticmethod
    def _failed_output(request_id: str, message: str) -> RequestOutput:
        return RequestOutput(request_id, None, [], None, [], finished=True, error=message)

    def _advance(self, c: ScheduledChunk, rows: torch.Tensor) -> None:
        """Bookkeeping of a chunk before sampling: prompt logits kept for prompt_logprobs, the prefix stored."""
        s = c.state
        prompt = s.seq.prompt_token_ids
        if s.want_prompt_logits and c.start < len(prompt):
            s.prompt_logits.append(rows)
        s.num_computed += c.num_tokens
        if s.store_at is not None and s.num_computed == s.store_at:
            self.runner.store_prefix(s.key, prompt[:s.store_at])
            s.store_at = None
        if c.sample and s.want_prompt_logits and s.num_computed >= len(prompt):
            req = self.requests[s.request_id]
            req.out.prompt_logprobs = prompt_logprobs(torch.cat(s.prompt_logits)[:len(prompt)], prompt,
                                                      req.prompt_targets, req.params.prompt_logprobs, self.tokenizer)
            s.want_prompt_logits, s.prompt_logits = False, []

    def _output(self, req: _Request) -> RequestOutput | None:
        """This step's output of a request in its output kind (None: nothing to send yet)."""
        out = req.out
        finished = all(s.seq.finished for s in req.states)
        if finished:
            self.requests.pop(out.request_id, None)
        kind = req.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if kind == RequestOutputKind.DELTA:  # the prompt and its logprobs travel once, with the first delta
            first = not req.emitted
            req.emitted = True
            prompt_lps, out.prompt_logprobs = out.prompt_logprobs, None
            return RequestOutput(out.request_id, out.prompt if first else None,
                                 out.prompt_token_ids if first else [], prompt_lps,
                                 [s.seq.delta_output() for s in req.states], finished, out.num_cached_tokens)
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, out.prompt_logprobs,
                             [s.seq.output() for s in req.states], finished, out.num_cached_tokens)

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
