"""Tokenizer from a local HF directory: `tokenizer.json` + `tokenizer_config.json` (chat template, specials).

Also the incremental detokenizer each sequence uses to stream text: it decodes a short window of tokens so a
multi-byte character split across tokens is emitted once it is complete, never as a replacement character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dspark.engine.gguf_model import build_tokenizer, find_gguf, open_gguf

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def format_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Python twin of CHATML_TEMPLATE, used to format training text (a test keeps the two equal)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _token_text(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")


class Tokenizer:
    def __init__(self, path: str | Path):
        """`path`: an HF directory (tokenizer.json + tokenizer_config.json), or a GGUF file (or a directory
        holding one), whose vocabulary, specials and chat template are read from the file itself."""
        path = Path(path)
        gguf = find_gguf(path)
        if gguf is not None:
            ckpt = open_gguf(gguf)
            self.tok = build_tokenizer(ckpt)
            tokens = ckpt.meta["tokenizer.ggml.tokens"]
            bos = ckpt.meta.get("tokenizer.ggml.bos_token_id")
            # llama.cpp adds BOS to a SentencePiece ("llama") vocabulary whose file does not say otherwise
            spm = ckpt.meta.get("tokenizer.ggml.model") == "llama"
            self.config = {"chat_template": ckpt.meta.get("tokenizer.chat_template"),
                           "bos_token": tokens[bos] if bos is not None else None,
                           "add_bos_token": ckpt.meta.get("tokenizer.ggml.add_bos_token", spm)}
            eos_ids = ckpt.eos_ids()
        else:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            cfg_path = path / "tokenizer_config.json"
            self.config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        self.chat_template = template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        if gguf is not None:
            self.eos_ids = eos_ids
            self.eos_token = self.tok.id_to_token(eos_ids[0]) if eos_ids else None
        else:
            self.eos_token = _token_text(self.config.get("eos_token"))
            self.eos_ids = self._eos_ids(path)
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])

            def raise_exception(msg):
                raise jinja2.TemplateError(msg)

            env.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(template)

    def _eos_ids(self, path: Path) -> list[int]:
        ids: list[int] = []
        gen = path / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids += [e] if isinstance(e, int) else list(e or [])
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            ids.append(self.tok.token_to_id(self.eos_token))
        return sorted(set(ids))

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        text = self.apply_chat_template(messages, **kwargs)
        # The template already wrote any BOS; encode without adding another.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas with the `tokenizers` library's streaming decoder (one Rust call
    per token; it holds back the bytes of a character split across tokens), as vLLM's fast detokenizer does."""

    CONTEXT = 6  # prompt tokens fed first (their text dropped), so that leading spaces decode as in the whole text

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.recent = list(prompt_ids[-self.CONTEXT :])  # the last tokens whose text has been given out
        self.pending: list[int] = []  # tokens whose text the decoder still holds back
        for t in self.recent:
            self._step(t)
        self.pending.clear()

    def _step(self, token_id: int) -> str | None:
        """The streaming decoder's text for one more token (None: held back). Should it ever fail, this request
        goes on with window decoding (two decodes per token, the method it replaced)."""
        if self.stream is not None:
            try:
                return self.stream.step(self.tok.tok, token_id)
            except Exception:
                self.stream = None
        text = self._window([*self.pending, token_id])
        return text if text and not text.endswith("\ufffd") else None

    def _window(self, ids: list[int]) -> str:
        """The text `ids` add after the tokens given out last (window decoding)."""
        prefix = self.tok.decode(self.recent, self.skip)
        return self.tok.decode([*self.recent, *ids], self.skip)[len(prefix) :]

    def add(self, token_id: int) -> str:
        chunk = self._step(token_id)
        if chunk is None:
            self.pending.append(token_id)
            return ""
        self.recent = [*self.recent, *self.pending, token_id][-self.CONTEXT :]
        self.pending.clear()
        return chunk

    def flush(self) -> str:
        """At the end of a sequence: whatever is still pending (an incomplete character decodes as U+FFFD)."""
        if not self.pending:
            return ""
        text = self._window(self.pending)
        self.recent, self.pending = [*self.recent, *self.pending][-self.CONTEXT :], []
        return text
