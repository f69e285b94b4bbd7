"""DeepSeek-V4 tokenizer: a deterministic byte-level test tokenizer and a thin wrapper used by the engine.

The test tokenizer keeps the real DeepSeek chat special tokens at ids 0..6 and gives every byte b the id
`BYTE_OFFSET + b` (16..271). Ids 7..15 and >= 272 are unused; a tiny model with a larger vocab may still
emit them, and they decode to "". `V4Tokenizer` works for any byte-level BPE `tokenizer.json` (the real
DeepSeek one included), and `IncrementalDecoder` turns a token stream into text for streaming.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIAL_TOKENS: dict[int, str] = {
    0: "<｜begin▁of▁sentence｜>",
    1: "<｜end▁of▁sentence｜>",
    2: "<｜User｜>",
    3: "<｜Assistant｜>",
    4: "<think>",
    5: "</think>",
    6: "<｜▁pad▁｜>",
}
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[6]
BYTE_OFFSET = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one `tokenizers`' ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {char: b for b, char in BYTE_TO_CHAR.items()}


def build_byte_tokenizer(path: str | Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for the byte-level test tokenizer into directory `path`.

    The output is byte-for-byte deterministic and loads with both `tokenizers.Tokenizer.from_file` and
    `transformers.AutoTokenizer.from_pretrained(path)`; the post-processor prepends bos as DeepSeek's does.
    """
    assert sorted(BYTE_TO_CHAR.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {content: token_id for token_id, content in SPECIAL_TOKENS.items()}
    vocab.update({BYTE_TO_CHAR[b]: BYTE_OFFSET + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The specials are already in the vocab, so add_special_tokens keeps their ids 0..6.
    tokenizer.add_special_tokens(
        [AddedToken(SPECIAL_TOKENS[i], special=True, normalized=False) for i in sorted(SPECIAL_TOKENS)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, 0)]
    )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
    }
    config_text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / "tokenizer_config.json").write_text(config_text, encoding="utf-8")


class V4Tokenizer:
    """Encode prompts and decode generations with a byte-level BPE `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Highest id + 1, not the token count: the test vocab has holes at 7..15.
        self.vocab_size = max(vocab.values()) + 1
        self.special_token_ids = frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)
        self.bos_token_id = self._require_id(BOS_TOKEN)
        self.eos_token_id = self._require_id(EOS_TOKEN)
        self._token_text: dict[int, str] = {}  # decode_token's answers: logprobs ask for ~21 per token
        self._token_bytes: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # token_bytes', by skip_special

    @classmethod
    def from_dir(cls, path: str | Path) -> "V4Tokenizer":
        """Load `<path>/tokenizer.json` (HF fast-tokenizer format)."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer: {file} does not exist; point at a directory holding tokenizer.json or create a "
                f"test one with v4ray.model.tokenizer.build_byte_tokenizer({str(path)!r})"
            )
        return cls(Tokenizer.from_file(str(file)))

    def _require_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer: special token {token!r} is missing from the vocabulary; use a DeepSeek-V4 tokenizer.json"
            )
        return token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside `text` become their special ids."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def token_id(self, token: str) -> int | None:
        """The id of a token given by its text (a special token's, e.g. "</think>"), None when it is not one."""
        return self._tokenizer.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar libraries build their token tables from)."""
        return self._tokenizer.to_str()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; unused ids give "", incomplete UTF-8 gives U+FFFD instead of raising."""
        valid = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(valid, skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """Text of one token as shown in logprob dicts (specials spelled out, partial UTF-8 as U+FFFD)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Raw bytes of one token, mirroring the ByteLevel decoder; b"" for unused ids and skipped specials.
        Every generated token asks (the streaming detokenizer): each answer is kept."""
        known = self._token_bytes[skip_special_tokens]
        raw = known.get(token_id)
        if raw is None:
            raw = known[token_id] = self._token_bytes_of(token_id, skip_special_tokens)
        return raw

    def _token_bytes_of(self, token_id: int, skip_special_tokens: bool) -> bytes:
        token = self._tokenizer.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if token is None or (skip_special_tokens and token_id in self.special_token_ids):
            return b""
        if all(char in CHAR_TO_BYTE for char in token):
            return bytes(CHAR_TO_BYTE[char] for char in token)
        return token.encode("utf-8")  # added tokens outside the byte alphabet are literal text

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A fresh streaming detokenizer for one sequence."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenizer: `step(token_id)` returns the text completed by that token.

    Bytes of a multi-byte UTF-8 character split over several tokens are held back until the character
    completes; invalid sequences become U+FFFD, so the concatenation of all `step` outputs plus `flush()`
    equals `V4Tokenizer.decode` of the whole sequence.
    """

    def __init__(self, tokenizer: V4Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """Feed one generated token id; return the newly completed text (possibly "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip_special_tokens))

    def flush(self) -> str:
        """End of sequence: return held-back bytes of an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)
