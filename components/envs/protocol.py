"""The Search-R1 agent protocol: tags, how a model turn is read, how an observation is written.

A model turn is `<search> query </search>` (the environment answers with
`<information> docs </information>`) or `<answer> text </answer>` (the episode ends); text before the tag
(e.g. `<think>…</think>`) is the model's own. A turn ends at the first closing tag, found as text whatever tokens
spell it. Two observation formats: `words`, for the synthetic world's word-level tokenizer (lower-case words
separated by single spaces, so each word is one token), and `search-r1`, Search-R1's own (`Doc i(Title: …) …`
lines between newlines), for every other tokenizer.
"""

from __future__ import annotations

import re

# Search-R1's instruction: the default `agent.prompt_template` for questions that are not chat messages yet.
from arborl.components.config.environment import SEARCH_R1_TEMPLATE as SEARCH_R1_TEMPLATE

QUESTION_OPEN, QUESTION_CLOSE = "<question>", "</question>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = [QUESTION_OPEN, QUESTION_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFO_OPEN, INFO_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
TURN_STOPS = (SEARCH_CLOSE, ANSWER_CLOSE)  # a generated turn ends at either closing tag (or EOS / the cap)

# What the environment answers to a turn that neither searches nor answers (`agent.on_invalid: continue`).
INVALID_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)
OBSERVATION_FORMATS = ("words", "search-r1")

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


def observation(docs: list[str], style: str = "words") -> str:
    """The observation text for the documents a search returned (`style`: one of OBSERVATION_FORMATS).

    Documents are corpus `contents`; in the `search-r1` style a multi-line one is a title line, then its text."""
    if style == "search-r1":
        lines = []
        for i, doc in enumerate(docs, 1):
            title, _, text = doc.partition("\n")
            lines.append(f"Doc {i}(Title: {title}) {text}\n")
        return f"\n\n{INFO_OPEN}{''.join(lines).strip()}{INFO_CLOSE}\n\n"
    if style != "words":
        raise ValueError(f"unknown observation format {style!r}; choose one of {', '.join(OBSERVATION_FORMATS)}")
    body = " ".join(" ".join(words(d)) for d in docs)
    return f" {INFO_OPEN} {body} {INFO_CLOSE}" if body else f" {INFO_OPEN} {INFO_CLOSE}"


def first_stop(turn_text: str) -> tuple[str, int] | None:
    """The closing tag that ended a turn (the first one in its text) and where it starts; None without one."""
    found = [(turn_text.find(tag), tag) for tag in TURN_STOPS if tag in turn_text]
    return (min(found)[1], min(found)[0]) if found else None


def turn_action(turn_text: str) -> str:
    """Classify one generated turn by its first closing tag: 'search', 'answer' or 'invalid' (none)."""
    stop = first_stop(turn_text)
    if stop is None:
        return "invalid"
    return "search" if stop[0] == SEARCH_CLOSE else "answer"


def search_query(turn_text: str) -> str:
    """The query of a search turn: the words between the last `<search>` and the closing tag (all words before the
    tag when `<search>` is missing), protocol tags left out."""
    stop = first_stop(turn_text)
    text = turn_text[: stop[1]] if stop else turn_text
    if SEARCH_OPEN in text:
        text = text[text.rindex(SEARCH_OPEN) + len(SEARCH_OPEN) :]
    return " ".join(t for t in text.split() if t not in TAGS)


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
