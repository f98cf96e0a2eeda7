"""The tokenizer: `tokenizers` over `tokenizer.json`, special ids from the configs,
and the chat template of `tokenizer_config.json` when there is one."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import threading
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    pass


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<|endoftext|>", ...}
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, folder: str | Path, eos_token_ids: list[int] | None = None, pad_token_id: int | None = None):
        folder = Path(folder)
        f = folder / "tokenizer.json"
        if not f.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{f}: cannot load ({e})") from None
        self.path = f  # tokenizer.json: grammar-constrained decoding builds its own view of the vocabulary from it
        tc_path = folder / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
        if not isinstance(tc, dict):
            raise TokenizerError(f"{tc_path}: not a JSON object")
        # what /tokenizer_info answers: read once here, never again from a disk that may have changed since
        self.config: dict[str, Any] = tc
        self.chat_template: str | None = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
        jinja = folder / "chat_template.jinja"  # where transformers 5 (and gpt-oss's hub repos) keep it; it wins
        if jinja.is_file():
            self.chat_template = jinja.read_text(encoding="utf-8")
        self.bos_token = _token_text(tc.get("bos_token"))
        self.eos_token = _token_text(tc.get("eos_token"))
        eos = list(eos_token_ids or [])
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None and tid not in eos:
            eos.append(tid)
        self.eos_token_ids = eos
        pad_text = _token_text(tc.get("pad_token"))
        if pad_token_id is None and pad_text is not None:
            pad_token_id = self._tok.token_to_id(pad_text)
        self.pad_token_id = pad_token_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # Tokenizing a long text takes transients of ~100x its size. At most two at a time, and their
    # freed heap pages handed back after each (glibc keeps them in the worker thread's arena
    # otherwise: rounds of 8 concurrent 800 KB prompts took a server from 265 MB to 2.7 GB).
    LONG_TEXT = 1 << 16
    _long_texts = threading.BoundedSemaphore(2)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > self.LONG_TEXT:
            from .quant.lazy_int8 import release_freed_heap

            with self._long_texts:
                ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
                release_freed_heap()
            return ids
        if len(text) > 4096:
            # `encode_batch` releases the GIL while the Rust side works (`encode` holds it): a long text
            # tokenized on a worker thread must not stall the server's event loop for seconds
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token covers: the longest token
        string in UTF-8 (byte-level BPE writes one character per byte, SentencePiece's
        '▁' and '<0x41>' spell fewer bytes than they take; never fewer)."""
        return max((len(t.encode("utf-8")) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def min_tokens(self, text: str) -> int:
        """At least how many tokens `text` becomes, without tokenizing it: characters
        over the longest token's bytes (a character is at least one byte), divided by
        4 more where a normalizer runs first (composing characters shrinks text)."""
        per = self.max_token_bytes * (4 if self._tok.normalizer is not None else 1)
        return -(-len(text) // per)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token contributes (for logprobs' `tokens`)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The template over `messages`, as transformers' `apply_chat_template(tokenize=False)` renders
        it: `tools` (OpenAI's {"type": "function", "function": {...}} objects) and any other keyword
        (`enable_thinking`, ...) are template variables."""
        if self.chat_template is None:
            raise TokenizerError("this model's tokenizer has no chat template")
        import jinja2.sandbox  # a template is data from the checkpoint: render it sandboxed

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg: str) -> None:
            raise TokenizerError(f"chat template: {msg}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                   sort_keys: bool = False) -> str:
            # transformers' filter: non-ASCII kept as is (jinja2's own escapes HTML characters)
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        # transformers' template globals: gpt-oss's harmony template dates its system message
        env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(**{**kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt,
                              "tools": tools, "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""})


class IncrementalDetokenizer:
    """The text of a growing token sequence, one step at a time, without
    re-decoding the whole sequence every step (which is quadratic in its length).

    vLLM's method: decode only a window of recent tokens twice, the tokens
    already released (`prefix_offset:read_offset`) and the same plus the new ones
    (`prefix_offset:`); the new text is the difference. A window that ends inside
    a multi-byte character (decoded as U+FFFD) waits for the next token. The
    released deltas concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete (maybe "")."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new[len(prefix):]
        return ""

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the end
        decodes as U+FFFD, as a whole-sequence decode gives it)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new[len(prefix):]
