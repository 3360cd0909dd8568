"""components.verification.scoring: the reward per data source, TRL batching, verl ground truths, failures as
per-response errors (raise, hang, wrong length), correctness from the threshold or `acc`."""

from __future__ import annotations

import json

import pytest

from arborl.components.config import VerifyConfig
from arborl.components.verification.calls import sample_from_prompt
from arborl.components.verification.scoring import Sample, reward_spec, score_samples

RIGHT = "<answer> paris </answer>"
WRONG = "<answer> rome </answer>"


def sample(response: str, source: str = "nq", **kw) -> Sample:
    return Sample(response, ["paris"], source, prompt=f"<question> {source} </question>", **kw)


def cfg(**reward: str) -> VerifyConfig:
    return VerifyConfig(reward={"default": "qa_em_format", **reward}, timeout_s=0.2)


def test_the_default_config_scores_everything_with_qa_em_format():
    out = score_samples([sample(RIGHT), sample(WRONG, "hotpotqa"), sample("x")], VerifyConfig())
    assert [o.reward for o in out] == [1.0, 0.2, 0.0]
    assert [o.verifier for o in out] == ["qa_em_format"] * 3 and all(o.error is None for o in out)


def test_the_reward_is_picked_by_data_source():
    c = cfg(gsm8k="math", squad="qa_f1")
    assert reward_spec(c, "gsm8k") == "math" and reward_spec(c, "nq") == "qa_em_format"
    out = score_samples([sample("\\boxed{0.5}", "gsm8k"), sample("<answer> paris france </answer>", "squad"),
                         sample(RIGHT, "nq")], c)
    assert [o.verifier for o in out] == ["math", "qa_f1", "qa_em_format"]
    assert out[0].reward == 0.0  # gold "paris" is no number
    assert out[1].reward == pytest.approx(2 / 3) and out[2].reward == 1.0


def test_trl_callables_get_one_batched_call_per_reward(reward_fns):
    c = cfg(nq="user_reward_fns:trl_contains")
    samples = [sample(RIGHT), sample("other", "hotpotqa"), sample(WRONG),
               sample(RIGHT, extra_info={"hops": 2}, columns={"ability": "qa"})]
    out = score_samples(samples, c)
    assert [o.verifier for o in out] == ["user_reward_fns:trl_contains", "qa_em_format"] + [
        "user_reward_fns:trl_contains"] * 2
    assert [o.reward for o in out] == [1.0, 0.0, 0.0, 1.0]
    assert [o.correct for o in out] == [True, False, False, True] and out[0].em == out[0].f1 == 1.0
    assert len(reward_fns.CALLS) == 1  # one batch: the three nq responses
    kwargs = reward_fns.CALLS[0][1]
    assert kwargs["completions"] == [RIGHT, WRONG, RIGHT] and kwargs["prompts"] == ["<question> nq </question>"] * 3
    assert kwargs["ground_truth"] == [["paris"]] * 3 and kwargs["data_source"] == ["nq"] * 3
    assert kwargs["extra_info"] == [{}, {}, {"hops": 2}]
    assert kwargs["reward_model"][0] == {"style": "rule", "ground_truth": {"target": ["paris"]}}
    assert "ability" not in kwargs  # a column only some of the batch has is left out


def test_verl_ground_truth_is_reward_model_ground_truth_or_the_targets(reward_fns):
    c = cfg(default="user_reward_fns:verl_contains")
    rm = {"style": "rule", "ground_truth": {"target": ["lyon"]}}
    out = score_samples([sample("lyon", reward_model=rm), sample("paris"), sample("lyon")], c)
    assert [o.reward for o in out] == [1.0, 1.0, 0.0]
    # calls run in a pool, so they are recorded in the order they ran
    assert sorted(str(call[1]["ground_truth"]) for call in reward_fns.CALLS) == sorted(
        str(g) for g in ({"target": ["lyon"]}, {"target": ["paris"]}, {"target": ["paris"]}))


def test_correctness_from_the_threshold_or_acc(reward_fns):
    half = VerifyConfig(reward={"default": "user_reward_fns:trl_named_only"}, correct_threshold=2.0)
    out = score_samples([sample("one"), sample("one two"), sample("one two three")], half)
    assert [o.correct for o in out] == [False, True, True] and [o.reward for o in out] == [1.0, 2.0, 3.0]
    acc = score_samples([sample("right"), sample("left")], cfg(default="user_reward_fns:verl_dict"))
    assert [(o.reward, o.correct) for o in acc] == [(0.5, True), (0.5, False)]  # acc decides, not 0.5 >= 1
    assert acc[0].details == {"acc": True, "pred": "right"}


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("verl_raises", "user_reward_fns:verl_raises raised RuntimeError: boom in the reward"),
        ("verl_hangs", "CallTimeout: user_reward_fns:verl_hangs did not return within 0.2 s (verify.timeout_s)"),
        ("trl_hangs", "CallTimeout: user_reward_fns:trl_hangs did not return within 0.2 s (verify.timeout_s)"),
        ("trl_wrong_length", "ValueError: user_reward_fns:trl_wrong_length returned 1 rewards for 2 completions"),
        ("verl_string", "TypeError: user_reward_fns:verl_string's return is a str ('high'), not a number"),
    ],
)
def test_a_failing_callable_gives_reward_zero_and_its_error(reward_fns, name, error):
    out = score_samples([sample(RIGHT), sample(RIGHT, "other"), sample(WRONG)], cfg(nq=f"user_reward_fns:{name}"))
    for o in (out[0], out[2]):
        assert o.reward == 0.0 and not o.correct and o.error == error and o.details == {}
    assert out[0].answer == "paris" and out[0].valid_format  # evaluation still sees the answer and the format
    assert out[1].reward == 1.0 and out[1].error is None  # the other source is unaffected


def test_a_non_finite_trl_entry_fails_only_its_response(reward_fns):
    out = score_samples([sample("a"), sample("b")], cfg(default="user_reward_fns:trl_nan_first"))
    assert out[0].reward == 0.0 and "not a finite number" in out[0].error
    assert out[1].reward == 0.5 and out[1].error is None


def test_a_built_in_that_raises_fails_only_its_response(monkeypatch):
    from arborl.components.verification import rewards

    def broken(response, golds, settings):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(rewards._REGISTRY, "qa_em", rewards.Builtin("qa_em", broken, "broken"))
    out = score_samples([sample(RIGHT, "nq")], cfg(nq="qa_em"))
    assert out[0].reward == 0.0 and out[0].error == "ZeroDivisionError: oops"


def test_a_spec_that_stopped_resolving_names_its_key(reward_fns):
    c = cfg(nq="user_reward_fns:verl_dict")
    object.__setattr__(c, "reward", {"default": "qa_em_format", "nq": "user_reward_fns:gone"})  # skip validation
    with pytest.raises(ValueError, match=r"verify\.reward\.nq: 'user_reward_fns:gone'"):
        score_samples([sample(RIGHT)], c)


def test_sample_from_prompt_reads_both_prompt_schemas():
    v1 = {"prompt_id": "p", "data_source": "nq", "prompt": "q?", "ground_truth": ["a", "b"], "split": "train",
          "extra_info": json.dumps({"hops": 2})}
    s = sample_from_prompt(v1, "resp")
    assert (s.response, s.golds, s.data_source, s.prompt, s.extra_info) == ("resp", ["a", "b"], "nq", "q?",
                                                                            {"hops": 2})
    assert s.reward_model is None and s.ground_truth == {"target": ["a", "b"]} and s.columns == {}
    messages = [{"role": "user", "content": "q?"}]
    v2 = {**v1, "messages": json.dumps(messages), "ability": "math",
          "reward_model": json.dumps({"style": "rule", "ground_truth": "42"})}
    s = sample_from_prompt(v2, "resp")
    assert s.ground_truth == "42" and s.columns == {"ability": "math", "messages": messages}
    with pytest.raises(ValueError, match=r"prompt 'p': column 'reward_model' is not valid JSON"):
        sample_from_prompt({**v1, "reward_model": "{"}, "resp")
    assert sample_from_prompt({**v1, "extra_info": ""}, "r").extra_info == {}


def test_reward_calls_run_in_a_bounded_pool_and_keep_their_order(reward_fns):
    from arborl.components.config import VerifyConfig
    from arborl.components.verification.scoring import Sample, score_samples

    samples = [Sample(f"<answer> {i} </answer>", [str(i)], "nq") for i in range(40)]
    reward_fns.RUNNING.update(now=0, most=0)
    out = score_samples(samples, VerifyConfig(reward={"default": "user_reward_fns:verl_counts_concurrency"},
                                              workers=4))
    assert [o.reward for o in out] == [1.0] * 40 and 1 < reward_fns.RUNNING["most"] <= 4
    reward_fns.RUNNING.update(now=0, most=0)
    score_samples(samples[:5], VerifyConfig(reward={"default": "user_reward_fns:verl_counts_concurrency"},
                                            workers=1))
    assert reward_fns.RUNNING["most"] == 1


def test_the_circuit_breaker_fails_fast_on_failures_in_a_row(reward_fns):
    from arborl.components.config import VerifyConfig
    from arborl.components.verification.scoring import RewardErrors, Sample, score_samples

    samples = [Sample(f"<answer> {i} </answer>", [str(i)], "nq") for i in range(200)]
    cfg = VerifyConfig(reward={"default": "user_reward_fns:verl_raises"}, breaker=5, workers=2)
    with pytest.raises(RewardErrors, match=r"user_reward_fns:verl_raises: 5 reward calls in a row failed "
                                           r"\(verify.breaker=5, of 200 responses\); the last: .*boom in the reward"):
        score_samples(samples, cfg)
    off = score_samples(samples[:10], cfg.model_copy(update={"breaker": 0}))
    assert all(o.error and o.reward == 0.0 for o in off)  # counted per response; the stage's budget decides


def test_process_isolation_kills_a_hung_call_and_survives_a_crash(reward_fns, tmp_path):
    import os
    import time

    pid_file = tmp_path / "pid"
    hung = Sample("x", ["x"], "nq", extra_info={"pid_file": str(pid_file)})
    right = Sample("<answer> 3 </answer>", ["3"], "nq")
    cfg = VerifyConfig(reward={"default": "user_reward_fns:verl_records_pid_then_hangs",
                               "crash": "user_reward_fns:verl_exits", "ok": "user_reward_fns:verl_contains"},
                       isolation="process", timeout_s=1.0, workers=2)
    crash = Sample("y", ["y"], "crash")
    ok = Sample("it is 3", ["3"], "ok")
    out = score_samples([hung, crash, ok, right], cfg)
    assert "did not return within 1 s (verify.timeout_s); its worker process was killed" in out[0].error
    assert "the worker process died" in out[1].error and "exit code 7" in out[1].error
    assert out[2].error is None and out[2].reward == 1.0
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hung reward's worker {pid} still runs")
