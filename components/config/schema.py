"""The whole config: every section, the checks across sections, and the section hash manifests use."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, model_validator

from arborl.components.config import choices
from arborl.components.config.algorithm import (
    AdvantageConfig,
    BudgetConfig,
    EvaluateConfig,
    SamplingConfig,
    TrainConfig,
    VerifyConfig,
)
from arborl.components.config.base import Strict
from arborl.components.config.environment import (
    AgentConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    SearchConfig,
    WarmstartConfig,
    WorldConfig,
)
from arborl.components.config.orchestration import OrchestrationConfig
from arborl.components.config.services import RegistryConfig, StorageConfig, TrackingConfig, ViewerConfig


class Config(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmstart: WarmstartConfig = Field(default_factory=WarmstartConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    viewer: ViewerConfig = Field(default_factory=ViewerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _registered_choices_fit(self) -> Config:
        # a model-level error has no key of its own: each check's message names the keys (e.g. advantage.estimator
        # and the train key it cannot train with)
        choices.check_config(self)
        return self

    @model_validator(mode="after")
    def _start_model(self) -> Config:
        if not self.warmstart.enabled and self.model.path is None:
            raise ValueError("warmstart.enabled is false but model.path is null: without a warm start RL starts "
                             "from model.path, so set it (or set warmstart.enabled: true)")
        return self

    @model_validator(mode="after")
    def _parquet_needs_its_own_model_and_retriever(self) -> Config:
        # Parquet prompts come without the synthetic world: no facts to search in-process, no demonstrations
        if self.data.source == "parquet":
            if self.search.backend != "http":
                raise ValueError("data.source is 'parquet' but search.backend is 'fts': Parquet data has no "
                                 "in-process corpus; set search.backend: http and search.url (e.g. a server "
                                 "started with `arborl serve-retriever`)")
            if self.warmstart.enabled:
                raise ValueError("data.source is 'parquet' but warmstart.enabled is true: the warm start "
                                 "demonstrates the synthetic world only; set warmstart.enabled: false and model.path")
        return self

    def section_hash(self, *sections: str, **params: Any) -> str:
        """Stable hash of the named sections (all when none), the seed and extra params; manifests use it
        to tell whether a finished stage was made with the same settings."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        else:  # where stages run does not change what they make
            data.pop("orchestration", None)
        payload = {"config": data, "seed": self.run.seed, "params": params}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
