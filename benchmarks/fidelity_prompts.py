"""Deterministic synthetic long prompts for the fidelity benchmark (no downloads).

Each prompt is ``[instruction | document | question]`` with the question in the last ``window``
tokens, so that the backend's text-only span (the prompt minus its last ``query_window`` tokens)
is the instruction plus the document. The document is one of five kinds, built entry by entry
from a seeded ``random.Random``:

- ``facts``:  one sentence of made-up facts about a made-up town per line;
- ``code``:   small Python functions with made-up names and constants;
- ``table``:  a markdown table of made-up inventory rows;
- ``log``:    server log lines with request ids;
- ``config``: ``section.key = value`` settings.

The question asks to copy 2–4 entries picked from across the document, and the *held-out
continuation* is those entries verbatim (its first ``continuation`` tokens). It depends on the
compressed span, so fidelity metrics on it see what compression lost.

Prompts are built in token ids for one tokenizer, to an exact length: the document is cut at the
token level (only complete entries are ever asked about).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

KINDS = ("facts", "code", "table", "log", "config")

_ONSETS = ["br", "k", "v", "t", "m", "s", "d", "gr", "h", "l", "n", "p", "r", "st", "th", "z", "f", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["n", "k", "r", "l", "m", "st", "th", "x", "v", "d", "", "ck"]
_GOODS = ["copper", "wool", "salt", "timber", "glass", "amber", "tin", "barley", "linen", "cider",
          "slate", "honey", "iron", "flax", "paper", "clay"]
_ACTIONS = ["login", "logout", "upload", "download", "search", "checkout", "refresh", "delete"]
_LEVELS = ["INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"]
_KEYS = ["timeout", "retries", "port", "workers", "buffer", "threshold", "interval", "quota"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One benchmark prompt, in token ids of one tokenizer."""

    kind: str
    input_ids: list[int]  # [instruction | document | question], exactly the requested length
    continuation_ids: list[int]  # held-out continuation (the asked entries, verbatim)
    question_tokens: int  # tokens of the question block at the end of input_ids
    document_tokens: int
    asked: tuple[str, ...]  # the entries' names the question asks for


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        parts = rng.randint(2, 3)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(parts)) + rng.choice(_CODAS)
        if word not in used and 5 <= len(word) <= 11:
            used.add(word)
            return word


def _facts(rng: random.Random, index: int, name: str) -> str:
    return (f"Fact {index}: The town of {name.capitalize()} has {rng.randint(1000, 99999):,} residents, "
            f"lies at {rng.randint(5, 2400)} metres, was founded in {rng.randint(1100, 1990)}, "
            f"and mainly exports {rng.choice(_GOODS)}.\n")


def _code(rng: random.Random, index: int, name: str) -> str:
    a, b, c = rng.randint(2, 97), rng.randint(2, 97), rng.randint(1, 9)
    op = rng.choice(["+", "-", "*"])
    return (f"def {name}_total(items, rate={c / 10:.1f}):\n"
            f"    total = {a}\n"
            f"    for item in items:\n"
            f"        total = total {op} item.price * {b}\n"
            f"    return round(total * rate, {c % 4})\n\n")


def _table(rng: random.Random, index: int, name: str) -> str:
    return (f"| {index:04d} | {name} | {rng.choice(_GOODS)} | {rng.randint(1, 9999)} "
            f"| {rng.randint(1, 999)}.{rng.randint(0, 99):02d} | aisle {rng.randint(1, 60)} |\n")


def _log(rng: random.Random, index: int, name: str) -> str:
    return (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} {rng.choice(_LEVELS)} "
            f"req={name} user=u{rng.randint(100, 999)} action={rng.choice(_ACTIONS)} "
            f"latency={rng.randint(3, 2000)}ms\n")


def _config(rng: random.Random, index: int, name: str) -> str:
    keys = rng.sample(_KEYS, 3)
    return "".join(f"{name}.{key} = {rng.randint(1, 5000)}\n" for key in keys)


_ENTRY: dict[str, Callable[[random.Random, int, str], str]] = {
    "facts": _facts, "code": _code, "table": _table, "log": _log, "config": _config}

_INSTRUCTION = {
    "facts": "Below is a gazetteer of towns, one fact line per town. Read it carefully; a question follows.\n\n",
    "code": "Below is a Python module. Read it carefully; a question about it follows.\n\n",
    "table": "Below is an inventory table. Read it carefully; a question about it follows.\n\n"
             "| id | item | material | stock | price | location |\n|---|---|---|---|---|---|\n",
    "log": "Below is a server log. Read it carefully; a question about it follows.\n\n",
    "config": "Below is a configuration file. Read it carefully; a question about it follows.\n\n",
}

_ASK = {
    "facts": "Copy the facts about {names}.",
    "code": "Copy the functions {names}.",
    "table": "Copy the rows of {names}.",
    "log": "Copy the log lines of {names}.",
    "config": "Copy the settings of {names}.",
}


def _question(kind: str, names: list[str]) -> str:
    shown = [n.capitalize() if kind == "facts" else (f"{n}_total" if kind == "code" else n) for n in names]
    listed = ", ".join(shown[:-1]) + " and " + shown[-1]
    return "\n\nQuestion: " + _ASK[kind].format(names=listed) + "\nAnswer:\n"


def make_prompt(tokenizer, kind: str, length: int, seed: int, continuation: int = 64,
                window: int = 32) -> Prompt:
    """One prompt of exactly ``length`` tokens whose question fits in the last ``window`` tokens.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer
        Its default special tokens (e.g. Gemma's ``<bos>``) start the prompt.
    kind : str
        One of :data:`KINDS`.
    length : int
        Total prompt tokens.
    seed : int
        Everything (names, numbers, which entries are asked) follows from it.
    continuation : int
        Tokens of held-out continuation to return.
    window : int
        The question block must fit in this many final tokens.
    """
    rng = random.Random(f"{kind}-{length}-{seed}")
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head = tokenizer(_INSTRUCTION[kind]).input_ids  # with the tokenizer's default BOS, if any
    used: set[str] = set()
    names: list[str] = []
    entries: list[list[int]] = []
    texts: list[str] = []
    doc_budget = length - len(head) - window  # room left once the question is in
    total = 0
    while total < doc_budget + 8:
        name = _name(rng, used)
        text = _ENTRY[kind](rng, len(entries) + 1, name)
        ids = encode(text)
        names.append(name)
        texts.append(text)
        entries.append(ids)
        total += len(ids)
    # Entries fully inside the document (leave the cut one out), spread over its length
    complete, running = 0, 0
    for ids in entries:
        if running + len(ids) > doc_budget - 1:
            break
        running += len(ids)
        complete += 1
    for count in (4, 3, 2):
        picks = sorted(rng.sample(range(complete), count))
        answer = "".join(texts[i] for i in picks)
        question = encode(_question(kind, [names[i] for i in picks]))
        answer_ids = encode(answer)
        if len(question) <= window and len(answer_ids) >= continuation:
            break
    else:
        raise ValueError(f"no question of ≤ {window} tokens with a {continuation}-token answer for {kind}")
    document = [t for ids in entries for t in ids][: length - len(head) - len(question)]
    input_ids = head + document + question
    assert len(input_ids) == length
    return Prompt(kind, input_ids, answer_ids[:continuation], len(question), len(document),
                  tuple(names[i] for i in picks))


def make_prompts(tokenizer, lengths: list[int], seed: int = 0, continuation: int = 64,
                 window: int = 32) -> list[Prompt]:
    """One prompt per entry of ``lengths``, cycling through :data:`KINDS`."""
    return [make_prompt(tokenizer, KINDS[i % len(KINDS)], length, seed * 1000 + i, continuation, window)
            for i, length in enumerate(lengths)]
