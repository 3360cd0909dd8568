"""Fixtures shared by the sampling tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def peaked_model(tiny_model):
    """The tiny random Llama re-initialised with large weights, so next-token distributions are far from
    uniform (greedy choices are not decided by float noise) yet greedy decoding does not just repeat."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, (32 / p.shape[1]) ** 0.5)
    tiny_model.eval()
    return tiny_model
