"""Grammar-constrained decoding: what a request's output must match, compiled once per grammar, and the token masks
of a step computed together (docs/architecture.md §15).

The library is llguidance (chosen by measurement, `bench/grammar.py`): its matchers follow a grammar token by
token and fill a bitmask of the tokens allowed next — one bit per vocabulary id, 32 per int32 word. Per step the
engine fills the masks of all its constrained rows (`GrammarBackend.fill`: on llguidance's thread pool, the GIL
released, when the model runs on a GPU), uploads them with one copy and applies them to the logits inside
sampling as one tensor op (`allowed_mask`); after the read-back each matcher takes its row's token
(`GrammarBackend.advance`).

A `StructuredOutput` (engine/sampling.py) is a JSON schema, any JSON object, or a Lark grammar (the chat layer
builds DSML tool-call grammars in that form, `model/chat.py`). Its `after_token_id` holds the constraint back
until that token was made: thinking mode reasons freely and the grammar starts after `</think>`.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

from v4ray.model.chat import JSON_STYLE

from .sampling import SamplingParamError, StructuredOutput

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar a request's `StructuredOutput` stands for."""
    import llguidance

    if structured.kind == "grammar":
        return structured.spec
    schema = structured.spec if structured.kind == "json_schema" else json.dumps({"type": "object"})
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise SamplingParamError(structured.param, f"{structured.param}: the JSON schema is not a JSON object: "
                                                   f"{e}") from None


def check_grammar(structured: StructuredOutput) -> None:
    """Compile-check without a tokenizer (the HTTP edge answers 400 before the request reaches an engine)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar_text(structured))
    if error:
        raise SamplingParamError(structured.param, f"{structured.param} cannot be enforced: {_one_line(error)}")


def _one_line(error: str) -> str:
    """llguidance's error on one line, cut to a size a 400 carries."""
    return " ".join(error.split())[:400]


class GrammarBackend:
    """One engine's grammar state: the tokenizer as llguidance sees it, compiled grammars cached by their text,
    and the thread pool that fills a step's masks."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int, parallel: bool = True,
                 threads: int | None = None):
        """vocab_size: the model's (its logits' width; ids the tokenizer lacks are never allowed). parallel: fill
        and advance a step's matchers on llguidance's thread pool (`threads`, default 80 % of the cores) — right
        when the model runs on a GPU and the CPU cores are idle. When the model runs on the CPU its threads hold
        the cores and a pool contends with them: the matchers then run one after another in the engine's thread
        (bench/grammar.py measured tokens/s at concurrency 32 at 0.94x unconstrained with the pool, 1.0x
        without, on 2 cores)."""
        import llguidance

        self._llg = llguidance
        self.words = (vocab_size + 31) // 32
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self.executor = llguidance.LLExecutor(threads) if parallel else None
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar text -> a fresh LLMatcher to copy

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher at the grammar's start; a grammar that does not compile is a SamplingParamError naming
        the request field. Compiled once per grammar text: later requests copy the compiled one."""
        grammar = grammar_text(structured)
        template = self._compiled.get(grammar)
        if template is None:
            template = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise SamplingParamError(structured.param, f"{structured.param} cannot be enforced: "
                                                           f"{_one_line(template.get_error())}")
            self._compiled[grammar] = template
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return template.deep_copy()

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def fill(self, rows: list[tuple[object, int]], num_rows: int) -> torch.Tensor:
        """The bitmask [num_rows, words] int32 (host) of a step: for each (matcher, row) that row holds the matcher's
        allowed tokens, filled on the pool all at once; every other row allows everything."""
        bitmask = torch.full((num_rows, self.words), -1, dtype=torch.int32)
        if self.executor is not None and rows:
            self.executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), self.words * 4, num_rows)
        else:
            for matcher, row in rows:
                matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), self.words * 4)
        return bitmask

    def advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        """Each matcher takes its token; False where the grammar refused it."""
        if self.executor is not None:
            return self.executor.consume_token_par(list(zip(matchers, tokens)))
        return [matcher.consume_token(token) for matcher, token in zip(matchers, tokens)]


def allowed_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmask [R, words] int32 -> allowed [R, vocab_size] bool, on the bitmask's device (one tensor op chain)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, words, 32]; bit j of word w is token 32 w + j
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
