"""Real prompt sources for drafter training and evaluation: held-out sets never leak into training."""

from dspark.engine.training.prompts import (
    GROUPS,
    HUMANEVAL_ASK,
    heldout_text,
    math_questions,
    prompt_set,
    signature_and_docstring,
)

SHAREGPT = [f"Question number {i}: tell me about topic {i * 7}." for i in range(400)]


def count(text: str) -> int:
    return len(text.split())


def test_signature_and_docstring_is_the_humaneval_shape():
    src = 'def add(a, b):\n    """Add two numbers.\n\n    More text.\n    """\n    return a + b\n'
    assert signature_and_docstring(src) == 'def add(a, b):\n    """Add two numbers.\n\n    More text.\n    """\n'
    assert signature_and_docstring('def f():\n    """Only a docstring."""\n') is None  # nothing to complete
    assert signature_and_docstring("def f():\n    return 1\n") is None


def test_train_and_heldout_are_disjoint_and_sized():
    train = prompt_set("train", {"code": 50, "chat": 60, "math": 40}, count, sharegpt=SHAREGPT)
    held = prompt_set("heldout", 20, count, sharegpt=SHAREGPT)
    assert {g: len(v) for g, v in train.items()} == {"code": 50, "chat": 60, "math": 40}
    assert {g: len(v) for g, v in held.items()} == dict.fromkeys(GROUPS, 20)
    for g in GROUPS:
        t = {m[0]["content"] for m in train[g]}
        h = {m[0]["content"] for m in held[g]}
        assert not t & h, g
        assert all(len(m) == 1 and m[0]["role"] == "user" for m in train[g] + held[g])
    assert all(heldout_text(m[0]["content"]) for m in held["chat"])
    assert not any(heldout_text(m[0]["content"]) for m in train["chat"])
    assert all(m[0]["content"].startswith(HUMANEVAL_ASK.split("\n")[0]) for m in held["code"])
    assert prompt_set("heldout", 20, count, sharegpt=SHAREGPT) == held  # deterministic


def test_prompts_over_the_token_cap_are_left_out():
    long = ["word " * 300] * 50 + SHAREGPT
    got = prompt_set("train", {"chat": 30}, count, max_prompt_tokens=256, sharegpt=long)
    assert len(got["chat"]) == 30 and all(count(m[0]["content"]) <= 256 for m in got["chat"])


def test_math_training_questions_exclude_the_heldout_ones():
    held = set(math_questions(200, 10_000))
    assert not held & set(math_questions(200, 0, held))
