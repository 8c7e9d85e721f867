"""Gemma tokenizer: text <-> token ids, loaded from a checkpoint folder's `tokenizer.json`.

Owns BOS policy, special-token ids and the stop-token set. Uses the `tokenizers` library
directly (no transformers import at run time). Knows strings and token ids only; nothing of
the engine, KV cache or HTTP.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from gemlora.text.tool_format import CONTROL_TOKENS

# Gemma's chat markup ends a turn with this; instruction-tuned models stop on it, not on <eos>.
END_OF_TURN = "<end_of_turn>"


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as "<bos>" or as {"content": "<bos>", ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(
        self,
        backend: _HFTokenizer,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        add_bos_token: bool = True,
    ) -> None:
        self._tk = backend
        self.bos_id: int | None = backend.token_to_id(bos_token)
        self.eos_id: int | None = backend.token_to_id(eos_token)
        self.add_bos_token = add_bos_token and self.bos_id is not None
        # FunctionGemma's control tokens are special, but they are the text of its calls: decoding keeps them
        self._kept = frozenset(i for i in map(backend.token_to_id, CONTROL_TOKENS) if i is not None)
        stops = {self.eos_id, backend.token_to_id(END_OF_TURN)}
        self.stop_token_ids: frozenset[int] = frozenset(i for i in stops if i is not None)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        # Gemma needs <bos> at the start of every sequence; a config that omits the flag
        # (e.g. one converted from GGUF) still means "add it".
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")) or "<bos>",
            eos_token=_token_text(cfg.get("eos_token")) or "<eos>",
            add_bos_token=bool(cfg.get("add_bos_token", True)),
        )

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The post-processor is bypassed (add_special_tokens=False) and BOS prepended here, so
        # BOS appears once whether or not tokenizer.json's post-processor also adds it.
        # Special-token strings in `text` (e.g. "<start_of_turn>") still map to their ids.
        # encode_batch, not encode: it releases the GIL, so a long text tokenized on a worker thread
        # does not stall the event loop or the engine (encode holds it for the whole text)
        ids = self._tk.encode_batch([text], add_special_tokens=False)[0].ids
        # A raw prompt written with HF's template already starts with <bos>: never send two.
        if add_bos and self.add_bos_token and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (so a text of n characters has at least
        n / max_token_chars tokens, before normalization)."""
        return max(1, max(len(t) for t in self._tk.get_vocab(with_added_tokens=True)))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if not (skip_special_tokens and self._kept and self._kept.intersection(ids)):
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []                    # the other special tokens skipped, the kept ones written
        for i in ids:
            if i in self._kept:
                out += [self._tk.decode(run, skip_special_tokens=True), self._tk.id_to_token(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._tk.decode(run, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (for libraries that build their own view of it)."""
        return self._tk.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to decoded text: byte-fallback pieces (`<0x0A>`) are their byte,
        SentencePiece's word marker (U+2581) is a space; special tokens are their own text."""
        piece = self._tk.id_to_token(token_id)
        if piece is None:
            return b""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()
