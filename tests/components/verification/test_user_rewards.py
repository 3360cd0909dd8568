"""components.verification.user_rewards: import by path, TRL/verl signature detection, return checks, and the
config check that refuses a callable it cannot use (naming verify.reward.<source> and the path)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arborl.components.config import ConfigError, config_from_dict
from arborl.components.verification.timeouts import CallTimeout
from arborl.components.verification.user_rewards import (
    TRL,
    VERL,
    call_trl,
    call_verl,
    finite,
    import_callable,
    load_user_reward,
)


def test_both_path_forms_import(reward_fns):
    assert import_callable("user_reward_fns:verl_dict") is reward_fns.verl_dict
    assert import_callable("user_reward_fns.verl_dict") is reward_fns.verl_dict
    assert import_callable("os.path:join") is import_callable("os.path.join")


def test_a_file_path_imports_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my rewards").mkdir()
    (tmp_path / "my rewards" / "score.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    fn = import_callable("my rewards/score.py:compute_score")
    assert fn("nq", "x", {}) == 0.5 and import_callable(str(tmp_path / "my rewards/score.py:compute_score")) is fn
    assert load_user_reward("my rewards/score.py:compute_score").style == VERL
    with pytest.raises(ValueError, match=r"cannot import module 'gone.py' .*FileNotFoundError: no file"):
        import_callable("gone.py:compute_score")


@pytest.mark.parametrize(
    ("path", "style", "params"),
    [
        ("user_reward_fns:trl_contains", TRL, None),  # **kwargs: every column
        ("user_reward_fns:trl_named_only", TRL, frozenset({"prompts", "completions"})),
        ("user_reward_fns:verl_contains", VERL, frozenset({"data_source", "solution_str", "ground_truth",
                                                           "extra_info"})),
        ("user_reward_fns:verl_no_extra_info", VERL, frozenset({"data_source", "solution_str", "ground_truth"})),
    ],
)
def test_signature_detection(reward_fns, path, style, params):
    reward = load_user_reward(path)
    assert (reward.style, reward.params) == (style, params)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("user_reward_fns_missing:f", r"cannot import module 'user_reward_fns_missing' of "
                                      r"'user_reward_fns_missing:f' \(ModuleNotFoundError"),
        ("user_reward_fns:nothere", r"'user_reward_fns:nothere': 'user_reward_fns' has no attribute 'nothere'"),
        ("user_reward_fns:NOT_CALLABLE", r"'user_reward_fns:NOT_CALLABLE' is not callable \(it is a int\)"),
        ("user_reward_fns:wrong_signature", r"'user_reward_fns:wrong_signature' \(x, y\) has neither reward "
                                            r"signature: expected TRL's"),
        ("user_reward_fns:trl_needs_tokenizer", r"'user_reward_fns:trl_needs_tokenizer' .* \(trl signature\) "
                                                r"requires tokenizer"),
        (":f", "is not an import path"),
    ],
)
def test_unusable_callables_are_refused_naming_the_path(reward_fns, path, message):
    with pytest.raises(ValueError, match=message):
        load_user_reward(path)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_package.rewards:score", r"verify\.reward\.nq: cannot import module 'no_such_package\.rewards' of "
                                          r"'no_such_package\.rewards:score'"),
        ("user_reward_fns:wrong_signature", r"verify\.reward\.nq: 'user_reward_fns:wrong_signature' \(x, y\) has "
                                            r"neither reward signature"),
    ],
)
def test_the_config_check_names_the_key_and_the_path(reward_fns, path, message):
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: " + message):
        config_from_dict({"verify": {"reward": {"default": "qa_em_format", "nq": path}}}, "cfg.yaml")


def test_the_config_needs_a_default_reward_and_known_names(reward_fns):
    with pytest.raises(ConfigError, match="verify.reward has no 'default' key"):
        config_from_dict({"verify": {"reward": {"nq": "qa_em"}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"verify\.reward\.default: unknown reward 'exact'"):
        config_from_dict({"verify": {"reward": {"default": "exact"}}}, "cfg.yaml")
    cfg = config_from_dict({"verify": {"reward": {"default": "math", "nq": "user_reward_fns:verl_dict"},
                                       "timeout_s": 0.5, "correct_threshold": 0.5, "require_think": True}})
    assert cfg.verify.reward == {"default": "math", "nq": "user_reward_fns:verl_dict"}


def test_call_verl_passes_keywords_and_reads_dicts(reward_fns):
    reward = load_user_reward("user_reward_fns:verl_contains")
    got = call_verl(reward, "nq", "it is paris", {"target": ["paris"]}, {"hops": 2}, timeout_s=5)
    assert got == (1.0, None, {})
    assert reward_fns.CALLS[-1] == ("verl_contains", {"data_source": "nq", "solution_str": "it is paris",
                                                      "ground_truth": {"target": ["paris"]},
                                                      "extra_info": {"hops": 2}})
    score, acc, details = call_verl(load_user_reward("user_reward_fns:verl_dict"), "nq", "right", {}, None, 5)
    assert (score, acc, details) == (0.5, True, {"acc": True, "pred": "right"})
    # no extra_info parameter: it is not passed
    assert call_verl(load_user_reward("user_reward_fns:verl_no_extra_info"), "nq", "x", {}, {}, 5)[0] == 0.25


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("verl_raises", RuntimeError, "boom in the reward"),
        ("verl_hangs", CallTimeout, r"user_reward_fns:verl_hangs did not return within 0\.2 s"),
        ("verl_string", TypeError, r"user_reward_fns:verl_string's return is a str \('high'\), not a number"),
        ("verl_inf", ValueError, r"user_reward_fns:verl_inf's return is inf, not a finite number"),
        ("verl_no_score", ValueError, r"user_reward_fns:verl_no_score returned a dict without 'score' \(keys: acc\)"),
    ],
)
def test_call_verl_failures(reward_fns, name, error, message):
    with pytest.raises(error, match=message):
        call_verl(load_user_reward(f"user_reward_fns:{name}"), "nq", "x", {}, None, timeout_s=0.2)


def test_call_trl_batches_and_checks_each_entry(reward_fns):
    reward = load_user_reward("user_reward_fns:trl_contains")
    cols = {"ground_truth": [["paris"], ["rome"]], "data_source": ["nq", "nq"], "extra_info": [{}, {}]}
    assert call_trl(reward, ["q1", "q2"], ["paris!", "london"], cols, timeout_s=5) == [(1.0, None), (0.0, None)]
    name, kwargs = reward_fns.CALLS[-1]
    assert kwargs["prompts"] == ["q1", "q2"] and kwargs["data_source"] == ["nq", "nq"]
    # a callable without **kwargs gets only the arguments it names
    named = load_user_reward("user_reward_fns:trl_named_only")
    assert call_trl(named, ["q"], ["a b c"], cols, 5) == [(3.0, None)]
    assert set(reward_fns.CALLS[-1][1]) == {"prompts", "completions"}
    nan = call_trl(load_user_reward("user_reward_fns:trl_nan_first"), ["q", "q"], ["a", "b"], {}, 5)
    assert nan[0][0] == 0.0 and "not a finite number" in nan[0][1] and nan[1] == (0.5, None)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("trl_wrong_length", ValueError, r"user_reward_fns:trl_wrong_length returned 1 rewards for 2 completions"),
        ("trl_not_a_list", TypeError, r"user_reward_fns:trl_not_a_list returned a float, not a list of 2 floats"),
        ("trl_hangs", CallTimeout, r"user_reward_fns:trl_hangs did not return within 0\.2 s"),
    ],
)
def test_call_trl_failures(reward_fns, name, error, message):
    with pytest.raises(error, match=message):
        call_trl(load_user_reward(f"user_reward_fns:{name}"), ["q", "q"], ["a", "b"], {}, timeout_s=0.2)


def test_finite_accepts_numbers_bools_and_array_scalars():
    assert finite(True, "x") == 1.0 and finite(np.float32(0.5), "x") == 0.5 and finite(np.array(2.0), "x") == 2.0
    with pytest.raises(ValueError, match="x is nan"):
        finite(math.nan, "x")
    with pytest.raises(TypeError, match="x is a NoneType"):
        finite(None, "x")
