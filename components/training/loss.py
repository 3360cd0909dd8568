"""Clipped policy-gradient loss (docs/design.md, Policy update) on per-token advantage weights.

Each trainable token carries A⁺ (sum of the positive advantages of the trajectories through it), A⁻
(sum of the negative ones) and a multiplicity. A duplicated trajectory with advantage A is the special
case A⁺ = max(A, 0), A⁻ = min(A, 0), multiplicity 1, so one function serves both forms.
"""

from __future__ import annotations

import torch


def clipped_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv_pos: torch.Tensor,
    adv_neg: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO objective with dual clip (to be maximised) and the clipped-token indicator.

    All inputs have the same shape (any); returns (objective, clipped) of that shape.
    A > 0: A·min(r, 1+ε_high).  A < 0: A·min(max(r, 1−ε_low), c).
    """
    ratio = torch.exp(logp - old_logp)
    pos = adv_pos * torch.clamp(ratio, max=1.0 + clip_high)
    neg = adv_neg * torch.clamp(torch.clamp(ratio, min=1.0 - clip_low), max=dual_clip)
    clipped = ((adv_pos > 0) & (ratio > 1.0 + clip_high)) | (
        (adv_neg < 0) & ((ratio < 1.0 - clip_low) | (ratio > dual_clip))
    )
    return pos + neg, clipped


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) per position. logits: (B, T, V) float; targets: (B, T) long → (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate from sampled tokens; same shape as the inputs.

    k1 = log π_θ − log π_ref (unbiased, high variance); k3 = exp(ref − logp) − (ref − logp) − 1
    (verl's `low_var_kl`: non-negative, unbiased, low variance).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the policy entropy at each position. logits (..., V), targets (...) → two (...)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
