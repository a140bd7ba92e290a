"""Training text that every machine with Python has: the interpreter's own standard library.

Three kinds of documents, all built deterministically from the running CPython:
- code: every `*.py` under the stdlib directory (no tests, no site-packages), as files;
- chat, code: "Write a Python function that <docstring summary>" -> the function's source, from the same files;
- chat, docs: questions about a language topic -> its text from `pydoc_data.topics` (the reference manual);
- chat, math: arithmetic word problems generated from templates, answered step by step.
Files whose path hashes into the held-out bucket are kept out of training (drafter evaluation uses them).
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

EXCLUDE_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "dist-packages"}


@dataclass
class Corpus:
    code: list[str]
    chat: list[list[dict]]  # lists of messages
    heldout_code: list[str]
    heldout_chat: list[list[dict]]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & EXCLUDE_DIRS)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0


def _functions(source: str) -> list[tuple[str, str]]:
    """(docstring summary, source) for functions with a one-line summary and a modest body."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.name.startswith("__"):
            continue
        summary = doc.strip().splitlines()[0].strip().rstrip(".")
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        seg = "".join(lines[first - 1 : node.end_lineno])
        if len(summary) < 12 or not 80 <= len(seg) <= 1600:
            continue
        out.append((summary, textwrap.dedent(seg)))
    return out


ASK_CODE = [
    "Write a Python function that {s}.",
    "Can you write Python code to {s}?",
    "Implement a function that does the following: {s}.",
    "Show me a Python function `{n}` that will {s}.",
]


def code_chats(path: Path, source: str, rng: random.Random) -> list[list[dict]]:
    chats = []
    for summary, seg in _functions(source):
        lower = summary[0].lower() + summary[1:]
        name = seg.split("(")[0].split()[-1]
        ask = rng.choice(ASK_CODE).format(s=lower, n=name)
        answer = f"Here is one way to do it:\n\n```python\n{seg.rstrip()}\n```"
        chats.append([{"role": "user", "content": ask}, {"role": "assistant", "content": answer}])
    return chats


ASK_DOC = [
    "What does the Python reference say about {t}?",
    "Explain {t} in Python.",
    "How does {t} work in Python?",
]


def doc_chats(rng: random.Random) -> list[list[dict]]:
    from pydoc_data.topics import topics

    chats = []
    for key in sorted(topics):
        text = topics[key].strip()
        topic = key.replace("-", " ")
        for part in [text[i : i + 1200] for i in range(0, min(len(text), 3600), 1200)]:
            ask = rng.choice(ASK_DOC).format(t=topic)
            chats.append([{"role": "user", "content": ask}, {"role": "assistant", "content": part.strip()}])
    return chats


NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "stamps", "cards", "shells"]


def math_problem(rng: random.Random) -> tuple[str, str]:
    """One arithmetic word problem and a worked answer ending in 'The answer is N.'"""
    a, b, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    x, y, z = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{a} has {x} {item} and buys {y} more. How many {item} does {a} have now?"
        s = f"{a} starts with {x} {item} and adds {y}. {x} + {y} = {x + y}. The answer is {x + y}."
    elif kind == 1:
        x = x + y
        q = f"{a} had {x} {item} and gave {y} of them to {b}. How many {item} does {a} have left?"
        s = f"{a} gives away {y} of {x}. {x} - {y} = {x - y}. The answer is {x - y}."
    elif kind == 2:
        q = f"There are {z} boxes with {y} {item} in each box. How many {item} are there in total?"
        s = f"Each of the {z} boxes holds {y} {item}. {z} * {y} = {z * y}. The answer is {z * y}."
    elif kind == 3:
        total = y * z
        q = f"{a} shares {total} {item} equally among {z} friends. How many {item} does each friend get?"
        s = f"{total} {item} split {z} ways. {total} / {z} = {y}. The answer is {y}."
    else:
        q = f"{a} has {x} {item}. {b} has {y} more than {a}. How many {item} do they have together?"
        s = (f"{b} has {x} + {y} = {x + y} {item}. Together they have {x} + {x + y} = {2 * x + y}. "
             f"The answer is {2 * x + y}.")
    return q, s


def math_chats(n: int, rng: random.Random) -> list[list[dict]]:
    out = []
    for _ in range(n):
        q, s = math_problem(rng)
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": s}])
    return out


def build_corpus(seed: int = 0, n_math: int = 6000) -> Corpus:
    rng = random.Random(seed)
    root = stdlib_dir()
    code, heldout_code, chat, heldout_chat = [], [], [], []
    for p in stdlib_files():
        rel = str(p.relative_to(root))
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = is_heldout(rel)
        (heldout_code if held else code).append(src)
        (heldout_chat if held else chat).extend(code_chats(p, src, rng))
    docs = doc_chats(rng)
    rng.shuffle(docs)
    k = max(1, len(docs) // 20)
    heldout_chat += docs[:k]
    chat += docs[k:]
    chat += math_chats(n_math, rng)
    heldout_chat += math_chats(n_math // 20, random.Random(seed + 1))
    return Corpus(code=code, chat=chat, heldout_code=heldout_code, heldout_chat=heldout_chat)
