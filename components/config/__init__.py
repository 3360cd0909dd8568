"""Typed configuration: pydantic models (unknown keys are errors), YAML files and `key.sub=value` overrides.

Every field carries its help text; `configs/tiny.yaml` documents the same keys with comments. The sections live
in `environment.py` (run, world, data, search, model, warm start, agent), `algorithm.py` (sampling, budget,
verify, advantage, train, evaluate), `services.py` (tracking, storage, viewer, registry) and `orchestration.py`;
`schema.py` puts them together and `loader.py` reads files and overrides. The config imports nothing of the
domain: choices that a registry knows are checked by that registry (`choices.py`).
"""

from arborl.components.config.algorithm import (
    AdvantageConfig,
    BudgetConfig,
    EvaluateConfig,
    LoraSettings,
    SamplingConfig,
    TrainConfig,
    VerifyConfig,
)
from arborl.components.config.base import Strict
from arborl.components.config.environment import (
    SEARCH_R1_TEMPLATE,
    AgentConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    SearchConfig,
    WarmstartConfig,
    WorldConfig,
)
from arborl.components.config.loader import (
    DEFAULT_CONFIG,
    INT_LIMIT,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
)
from arborl.components.config.orchestration import (
    GPU_STAGES,
    STAGE_NAMES,
    OrchestrationConfig,
    SecretRef,
    StageResources,
    VolumeConfig,
)
from arborl.components.config.schema import Config
from arborl.components.config.services import RegistryConfig, StorageConfig, TrackingConfig, ViewerConfig

__all__ = [
    "DEFAULT_CONFIG", "GPU_STAGES", "INT_LIMIT", "SEARCH_R1_TEMPLATE", "STAGE_NAMES", "AdvantageConfig",
    "AgentConfig", "BudgetConfig", "Config", "ConfigError", "DataConfig", "EvaluateConfig", "LoraSettings",
    "ModelConfig", "OrchestrationConfig", "RegistryConfig", "RunConfig", "SamplingConfig", "SearchConfig",
    "SecretRef", "StageResources", "Strict", "StorageConfig", "TrackingConfig", "TrainConfig", "VerifyConfig",
    "ViewerConfig", "VolumeConfig", "WarmstartConfig", "WorldConfig", "config_from_dict", "load_config",
    "parse_override",
]
