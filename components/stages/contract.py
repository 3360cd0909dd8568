"""The stage contract as types: the inputs each stage reads and the result every stage returns.

A stage is `run(cfg, inputs: {name: URI}, out: URI, **params) -> StageResult`. Its inputs are other stages'
output directories under the names below; `inputs_of(stage, uris)` checks a mapping against the stage's input
record and returns it typed, naming the stage and the key when one is missing or unknown. A `StageResult` is
what the flow, the CLI and the executors pass around; `to_dict()` is its JSON form (what `arborl stage` prints)
and `from_manifest` reads a finished output's manifest as one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

# input names: each is the output directory of the stage that makes it
WORLD = "world"  # prepare: prompts.parquet, facts.parquet
MODEL = "model"  # warmstart or train: a model directory
NODES = "nodes"  # sample: nodes.parquet
REWARDS = "rewards"  # verify: rewards.parquet
ADVANTAGES = "advantages"  # label: advantages.parquet
REFERENCE = "reference"  # the frozen warm-start model of train's KL penalty (train.kl_coef > 0)


class MissingInput(KeyError):
    """A stage was given inputs that do not fit its input record."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class StageInputs:
    """A stage's input URIs by name. Subclasses declare one field per input; optional ones default to None."""

    STAGE: ClassVar[str] = ""

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.default is MISSING)

    @classmethod
    def optional(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.default is not MISSING)

    @classmethod
    def from_uris(cls, uris: Mapping[str, str]) -> StageInputs:
        missing = [k for k in cls.required() if not uris.get(k)]
        unknown = sorted(set(uris) - {f.name for f in fields(cls)})
        if missing or unknown:
            wants = ", ".join(cls.required()) or "none"
            problem = f"missing {missing}" if missing else f"unknown {unknown}"
            raise MissingInput(f"stage {cls.STAGE!r}: {problem} inputs; it reads {wants}"
                               + (f" (optional: {', '.join(cls.optional())})" if cls.optional() else ""))
        return cls(**{k: v for k, v in uris.items()})

    def as_uris(self) -> dict[str, str]:
        """{name: URI} of the inputs given (an optional one left out is not listed)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class PrepareInputs(StageInputs):
    STAGE: ClassVar[str] = "prepare"


@dataclass(frozen=True)
class WarmstartInputs(StageInputs):
    STAGE: ClassVar[str] = "warmstart"
    world: str


@dataclass(frozen=True)
class SampleInputs(StageInputs):
    STAGE: ClassVar[str] = "sample"
    model: str
    world: str


@dataclass(frozen=True)
class VerifyInputs(StageInputs):
    STAGE: ClassVar[str] = "verify"
    nodes: str
    world: str


@dataclass(frozen=True)
class LabelInputs(StageInputs):
    STAGE: ClassVar[str] = "label"
    nodes: str
    rewards: str
    world: str


@dataclass(frozen=True)
class TrainInputs(StageInputs):
    STAGE: ClassVar[str] = "train"
    model: str
    nodes: str
    advantages: str
    world: str
    reference: str | None = None


@dataclass(frozen=True)
class EvaluateInputs(StageInputs):
    STAGE: ClassVar[str] = "evaluate"
    model: str
    world: str


INPUTS: dict[str, type[StageInputs]] = {c.STAGE: c for c in (
    PrepareInputs, WarmstartInputs, SampleInputs, VerifyInputs, LabelInputs, TrainInputs, EvaluateInputs)}
PARAMS: dict[str, tuple[str, ...]] = {"sample": ("iteration",), "train": ("iteration",)}  # beyond the inputs


def inputs_of(stage: str, uris: Mapping[str, str]) -> Any:
    """`uris` as `stage`'s typed input record; `MissingInput` naming the stage and the key otherwise."""
    return INPUTS[stage].from_uris(uris)


@dataclass
class StageResult:
    """What a stage returns: its output directory `out`, the URIs of its files by name (`outputs`), its
    `metrics`, the `seconds` it took (when it ran; else those recorded when it did) and whether a finished output
    was found and the stage `skipped`."""

    stage: str
    out: str
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_manifest(cls, out: str, manifest: Mapping[str, Any], skipped: bool = True) -> StageResult:
        """The finished output at `out` described by its manifest."""
        return cls(str(manifest["stage"]), out, dict(manifest["outputs"]), dict(manifest["metrics"]),
                   float(manifest["seconds"]), skipped)
