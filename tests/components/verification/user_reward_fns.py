"""User reward callables for the tests, imported by path as `user_reward_fns:<name>` (the tests put this folder on
sys.path with the `reward_fns` fixture). `CALLS` records every call's keyword arguments."""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Any

CALLS: list[tuple[str, dict[str, Any]]] = []
NOT_CALLABLE = 3


# --- TRL: fn(prompts, completions, **kwargs) -> list[float] ------------------------------------------------------


def trl_contains(prompts, completions, ground_truth, **kwargs):
    """1.0 when the completion contains the first gold answer."""
    CALLS.append(("trl_contains", {"prompts": prompts, "completions": completions, "ground_truth": ground_truth,
                                   **kwargs}))
    return [1.0 if golds[0] in c else 0.0 for c, golds in zip(completions, ground_truth, strict=True)]


def trl_named_only(prompts, completions):
    """No **kwargs: gets only prompts and completions; rewards the completion's length in words."""
    CALLS.append(("trl_named_only", {"prompts": prompts, "completions": completions}))
    return [float(len(c.split())) for c in completions]


def trl_nan_first(completions, **kwargs):
    return [math.nan] + [0.5] * (len(completions) - 1)


def trl_wrong_length(prompts, completions, **kwargs):
    return [1.0]


def trl_not_a_list(prompts, completions, **kwargs):
    return 1.0


def trl_hangs(prompts, completions, **kwargs):
    threading.Event().wait(5)
    return [1.0] * len(completions)


def trl_needs_tokenizer(prompts, completions, tokenizer):
    return [0.0] * len(completions)


# --- verl: compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict ---------------


def verl_contains(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 when the response contains any target of ground_truth["target"]."""
    CALLS.append(("verl_contains", {"data_source": data_source, "solution_str": solution_str,
                                    "ground_truth": ground_truth, "extra_info": extra_info}))
    return 1.0 if any(t in solution_str for t in ground_truth["target"]) else 0.0


def verl_dict(data_source, solution_str, ground_truth, extra_info=None):
    """A dict with a partial score and an `acc` that says correct when the response says 'right'."""
    return {"score": 0.5, "acc": "right" in solution_str, "pred": solution_str[-5:]}


def verl_no_extra_info(data_source, solution_str, ground_truth):
    return 0.25


def verl_raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("boom in the reward")


def verl_hangs(data_source, solution_str, ground_truth, extra_info=None):
    threading.Event().wait(5)
    return 1.0


def verl_string(data_source, solution_str, ground_truth, extra_info=None):
    return "high"


def verl_inf(data_source, solution_str, ground_truth, extra_info=None):
    return math.inf


def verl_no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}


def search_r1_style_em(solution_str, ground_truth, method="strict", format_score=0.0, score=1.0):
    """Shaped like Search-R1's `compute_score_em`: no data_source; the answer is the last <answer> block, and only
    when there are at least two, because the solution string it expects starts with the prompt, whose instructions
    show one example answer."""
    found = re.findall(r"<answer>(.*?)</answer>", solution_str, re.DOTALL)
    if len(found) <= 1:
        return 0.0
    answer = found[-1].strip().lower()
    return score if answer in [t.lower() for t in ground_truth["target"]] else format_score


RUNNING = {"now": 0, "most": 0}
_LOCK = threading.Lock()


def verl_counts_concurrency(data_source, solution_str, ground_truth, extra_info=None):
    """Scores 1 after a short wait, recording how many calls ran at once."""
    with _LOCK:
        RUNNING["now"] += 1
        RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    threading.Event().wait(0.02)
    with _LOCK:
        RUNNING["now"] -= 1
    return 1.0


def verl_none(data_source, solution_str, ground_truth, extra_info=None):
    return None


# --- neither signature -------------------------------------------------------------------------------------------


def wrong_signature(x, y):
    return 0.0


def verl_records_pid_then_hangs(data_source, solution_str, ground_truth, extra_info=None):
    """Writes its process id to extra_info['pid_file'], then never returns (for verify.isolation=process)."""
    import os

    with open(extra_info["pid_file"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(3600)


def verl_exits(data_source, solution_str, ground_truth, extra_info=None):
    """Ends its process at once, as a crashing extension would."""
    import os

    os._exit(7)
