"""The strict base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors, and values are not coerced: `true` is no integer, `1` no boolean, `"3"` no number
    (an integer is a valid float); numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)
