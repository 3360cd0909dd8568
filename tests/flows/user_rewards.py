"""A user reward in TRL's signature, imported by the end-to-end test by its path `tests.flows.user_rewards:...`."""

from __future__ import annotations


def answer_contains_truth(prompts, completions, ground_truth, **kwargs):
    """1.0 when a completion's last `<answer>` block contains one of its gold answers, else 0.0."""
    out = []
    for completion, golds in zip(completions, ground_truth, strict=True):
        answer = completion.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0].lower() if "<answer>" in completion \
            else ""
        out.append(1.0 if answer and any(g.lower() in answer for g in golds) else 0.0)
    return out
