"""The Search-R1 agent protocol: tags, how a model turn is read, how an observation is written.

A model turn is `<search> query </search>` (the environment answers with
`<information> docs </information>`) or `<answer> text </answer>` (the episode ends). Text is
lower-case words separated by single spaces, so a word-level tokenizer maps each word to one token.
"""

from __future__ import annotations

import re

QUESTION_OPEN, QUESTION_CLOSE = "<question>", "</question>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = [QUESTION_OPEN, QUESTION_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFO_OPEN, INFO_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
TURN_STOPS = (SEARCH_CLOSE, ANSWER_CLOSE)  # a generated turn ends at either closing tag (or EOS / the cap)

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-case and split into word tokens, punctuation as its own token (tags are kept whole)."""
    out: list[str] = []
    for chunk in text.lower().split():
        if chunk in TAGS:
            out.append(chunk)
        else:
            out.extend(_WORD.findall(chunk))
    return out


def question_prompt(question: str) -> str:
    return f"{QUESTION_OPEN} {' '.join(words(question))} {QUESTION_CLOSE}"


def observation(docs: list[str]) -> str:
    body = " ".join(" ".join(words(d)) for d in docs)
    return f" {INFO_OPEN} {body} {INFO_CLOSE}" if body else f" {INFO_OPEN} {INFO_CLOSE}"


def turn_action(turn_text: str) -> str:
    """Classify one generated turn: 'search', 'answer' or 'invalid'."""
    toks = turn_text.split()
    if toks and toks[-1] == SEARCH_CLOSE:
        return "search"
    if toks and toks[-1] == ANSWER_CLOSE:
        return "answer"
    return "invalid"


def search_query(turn_text: str) -> str:
    """The query of a search turn: the words after the last `<search>` (all words when it is missing)."""
    toks = turn_text.split()
    if toks and toks[-1] == SEARCH_CLOSE:
        toks = toks[:-1]
    if SEARCH_OPEN in toks:
        toks = toks[len(toks) - 1 - toks[::-1].index(SEARCH_OPEN) + 1 :]
    return " ".join(t for t in toks if t not in TAGS)


_BLOCK = re.compile(r"<(search|information|answer)>(.*?)</\1>", re.S)


def is_valid_sequence(solution: str) -> tuple[bool, str]:
    """Search-R1 structure check over the model's whole response (observations included).

    Valid means: zero or more `<search>…</search> <information>…</information>` pairs, then exactly one
    `<answer>…</answer>` at the end, each block non-empty, nothing outside the blocks.
    """
    pos, expect_info, n_answer = 0, False, 0
    text = solution.strip()
    for m in _BLOCK.finditer(text):
        between = text[pos : m.start()].strip()
        if between:
            return False, f"text outside tags: {between[:40]!r}"
        tag, body = m.group(1), m.group(2).strip()
        if any(t in body for t in TAGS):
            return False, f"nested tag in <{tag}>"
        if tag == "information":
            if not expect_info:
                return False, "<information> without a preceding <search>"
            expect_info = False
        else:
            if expect_info:
                return False, "search without <information>"
            if n_answer:
                return False, "content after <answer>"
            if not body:
                return False, f"empty <{tag}>"
            if tag == "search":
                expect_info = True
            else:
                n_answer += 1
        pos = m.end()
    if text[pos:].strip():
        return False, f"trailing text: {text[pos:].strip()[:40]!r}"
    if n_answer != 1:
        return False, "no <answer>"
    return True, "ok"


def extract_answer(solution: str) -> str | None:
    """The content of the last `<answer>…</answer>` block, or None."""
    found = re.findall(r"<answer>(.*?)</answer>", solution, re.S)
    return found[-1].strip() if found else None
