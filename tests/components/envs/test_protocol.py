"""components.envs.protocol: the Search-R1 tags, turn parsing and the format check."""

from __future__ import annotations

import pytest

from arborl.components.envs import protocol
from arborl.components.envs.protocol import extract_answer, is_valid_sequence, search_query, turn_action, words

VALID = [
    "<answer> paris </answer>",
    "  <answer> paris </answer>\n",
    "<search> kai ron born </search> <information> kai ron was born in paris . </information> <answer> paris </answer>",
    "<search> a </search> <information> </information> <search> b </search> <information> x </information>"
    " <answer> c </answer>",
    "<search>a</search><information>b</information><answer>c</answer>",
]

INVALID = [
    ("<search> a <answer> b </answer> </search> <information> x </information> <answer> c </answer>", "nested"),
    ("<answer> a <search> b </answer>", "nested"),
    ("<search> a </search> <answer> b </answer>", "without <information>"),
    ("<search> a </search>", "no <answer>"),
    ("<information> x </information> <answer> b </answer>", "without a preceding"),
    ("hello <answer> b </answer>", "outside"),
    ("<search> a </search> words <information> x </information> <answer> b </answer>", "outside"),
    ("<answer> b </answer> trailing", "trailing"),
    ("<answer> a </answer> <answer> b </answer>", "after <answer>"),
    ("<answer> a </answer> <search> b </search> <information> x </information>", "after <answer>"),
    ("<search> </search> <information> x </information> <answer> b </answer>", "empty <search>"),
    ("<answer>   </answer>", "empty <answer>"),
    ("", "no <answer>"),
    ("just words", "trailing"),
    ("<answer> unclosed", "trailing"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_sequences(text):
    assert is_valid_sequence(text) == (True, "ok")


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_sequences_say_why(text, reason):
    ok, why = is_valid_sequence(text)
    assert not ok
    assert reason in why


def test_extract_answer():
    assert extract_answer("<answer> paris </answer>") == "paris"
    assert extract_answer("<answer> a </answer> <answer>\n b c </answer>") == "b c"
    assert extract_answer("<search> q </search>") is None
    assert extract_answer("<answer> unclosed") is None
    assert extract_answer("<answer></answer>") == ""


@pytest.mark.parametrize(
    ("turn", "query"),
    [
        ("<search> kai ron born </search>", "kai ron born"),
        ("thinking <search> a b </search>", "a b"),
        ("<search> first </search> <search> later query </search>", "first"),  # a turn ends at its first tag
        ("<search>tight</search>\n", "tight"),  # BPE text: no spaces around the tags, characters after them
        ("kai ron born </search>", "kai ron born"),  # opening tag missing: all words
        ("<search> unclosed words", "unclosed words"),
        ("<search> </search>", ""),
        ("a <answer> b </search>", "a b"),  # other tags are dropped
    ],
)
def test_search_query(turn, query):
    assert search_query(turn) == query


@pytest.mark.parametrize(
    ("turn", "action"),
    [
        ("<search> q </search>", "search"),
        ("<answer> a </answer>", "answer"),
        ("<search> q </search>\n", "search"),  # the token that completed the tag may carry more characters
        ("<search> q", "invalid"),
        ("", "invalid"),
        ("<answer> a </answer> </search>", "answer"),  # the first closing tag ended the turn
    ],
)
def test_turn_action(turn, action):
    assert turn_action(turn) == action


def test_words():
    assert words("Where was Kai Ron born?") == ["where", "was", "kai", "ron", "born", "?"]
    assert words("kai ron was born in paris.") == ["kai", "ron", "was", "born", "in", "paris", "."]
    assert words("<search> A,B </search>") == ["<search>", "a", ",", "b", "</search>"]
    assert words("  spaced\tout\n") == ["spaced", "out"]
    assert words("") == []


def test_question_prompt_and_observation():
    assert protocol.question_prompt("Where was Kai born?") == "<question> where was kai born ? </question>"
    obs = protocol.observation(["Kai was born in Paris.", "Paris is a city in France."])
    assert obs == " <information> kai was born in paris . paris is a city in france . </information>"
    assert protocol.observation([]) == " <information> </information>"
    # an observation after a search keeps a response valid
    response = "<search> kai born </search>" + obs + " <answer> paris </answer>"
    assert is_valid_sequence(response) == (True, "ok")


def test_search_r1_observation_format():
    docs = ['"Paris"\nParis is the capital of France.', "one line"]
    assert protocol.observation(docs, "search-r1") == (
        '\n\n<information>Doc 1(Title: "Paris") Paris is the capital of France.\nDoc 2(Title: one line)'
        "</information>\n\n"
    )
    assert protocol.observation([], "search-r1") == "\n\n<information></information>\n\n"
    with pytest.raises(ValueError, match="unknown observation format"):
        protocol.observation(docs, "xml")
