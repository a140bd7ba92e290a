"""Structured outputs: a request's grammar (JSON mode or a JSON schema) as a token mask on the target's
distribution, with llguidance (chosen by `loadtest.grammar_bench`: 2 ms to compile a schema against outlines-core's
115 ms, tens of microseconds per mask, and the wider JSON Schema coverage).

The mask applies wherever the target's distribution is used: at plain sampling, and at verification, where row j
of a drafting request is masked by the grammar's state after the draft's first j tokens (the matcher consumes them
speculatively and rolls back). A draft token the grammar forbids has probability 0 under the masked target and is
rejected, so acceptance stays lossless with respect to the constrained distribution.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

MAX_SCHEMA_BYTES = 64_000


def allows(bitmask: np.ndarray, token: int) -> bool:
    """Is `token` allowed by a packed mask row?"""
    return bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed masks [R, words] (int32, on any device) -> allowed tokens [R, vocab] (bool), in one batched op."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


class GrammarError(ValueError):
    """The request's grammar cannot be used (invalid, too large, or not compilable): a 400."""


class GrammarCompiler:
    """One per engine: llguidance's view of the tokenizer (built on first use, ~0.3 s for 49k tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lltok = None

    @property
    def lltok(self):
        if self._lltok is None:
            import llguidance

            path = Path(tempfile.mkdtemp()) / "tokenizer.json"
            path.write_text(self.tokenizer.tok.to_str())
            self._lltok = llguidance.LLTokenizer(str(path), n_vocab=self.tokenizer.vocab_size,
                                                 eos_token=self.tokenizer.eos_ids)
        return self._lltok

    def grammar(self, response_format: dict) -> str:
        """llguidance grammar for OpenAI's response_format: json_object, or json_schema ({"schema": ...})."""
        import llguidance

        kind = response_format.get("type")
        if kind == "json_object":
            schema: dict | bool = {"type": "object"}
        elif kind == "json_schema":
            schema = response_format.get("json_schema", {}).get("schema", {})
            if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
                raise GrammarError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
        else:
            raise GrammarError(f"unknown response_format type {kind!r}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # llguidance raises ValueError or RuntimeError with the reason
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return self._validated(grammar, "the JSON schema")

    def lark(self, text: str, what: str = "the grammar") -> str:
        """llguidance grammar from Lark text (which may embed JSON schemas as `%json {...}`): tool calls."""
        import llguidance

        if len(text) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"{what} is larger than {MAX_SCHEMA_BYTES} bytes")
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        except Exception as e:
            raise GrammarError(f"{what} is invalid: {e}") from None
        return self._validated(grammar, what)

    def _validated(self, grammar: str, what: str) -> str:
        import llguidance

        msg = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
        if msg and not msg.startswith("WARNING"):
            raise GrammarError(f"{what} cannot be compiled: {msg}")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self.lltok, grammar)
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be compiled: {matcher.get_error()}")
        return Constraint(matcher, self.tokenizer.vocab_size, self.tokenizer.eos_ids)


class Constraint:
    """One request's grammar state: the allowed-token masks for a step's rows, and the tokens it commits."""

    def __init__(self, matcher, vocab: int, eos_ids: list[int]):
        self.matcher = matcher
        self.vocab = vocab
        # An end-of-sequence token ends the request: it is never fed to the matcher (a matcher stopped by it does
        # not roll back), and what follows it is never committed.
        self.eos = set(eos_ids)

    def bitmask(self) -> np.ndarray:
        """Allowed tokens in the current state, packed: token t is bit t % 32 of int32 word t // 32 (llguidance's
        layout; `unpack` spreads a batch of them on the logits' device)."""
        return np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)

    def mask(self) -> torch.Tensor:
        """Allowed tokens [V] (bool) in the current state."""
        return unpack(torch.from_numpy(self.bitmask())[None], self.vocab)[0]

    def masks(self, draft: list[int]) -> np.ndarray:
        """Packed allowed tokens [len(draft) + 1, words] for the rows that score draft[0..] and the bonus: row j
        after the draft's first j tokens. Rows past a token the grammar forbids repeat the last mask (they are
        never used: that token is rejected)."""
        rows = [self.bitmask()]
        consumed = 0
        for t in draft:
            if consumed == len(rows) - 1 and t not in self.eos and allows(rows[-1], t) and \
                    self.matcher.consume_token(t):
                consumed += 1
                rows.append(self.bitmask())
            else:
                rows.append(rows[-1])
        self.rollback(consumed)
        return np.stack(rows)

    def try_consume(self, token: int, allowed: torch.Tensor) -> bool:
        """Advance over a drafted token if `allowed` (its state's mask) permits it (rolled back after drafting)."""
        if token in self.eos or self.matcher.is_stopped() or not allowed[token]:
            return False
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token} its own mask allowed: {self.matcher.get_error()}")
        return True

    def rollback(self, n: int) -> None:
        if n:
            self.matcher.rollback(n)

    def commit(self, tokens: list[int]) -> None:
        """The step's committed tokens (each allowed by its row's mask, so the matcher accepts them)."""
        for t in tokens:
            if t in self.eos:  # the request ends here
                break
            if not self.matcher.consume_token(t):
                raise RuntimeError(f"grammar rejected committed token {t}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (only EOS would follow)."""
        return self.matcher.is_stopped()
