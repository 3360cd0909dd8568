"""The pipeline's stages. Each is `run(cfg, inputs: {name: uri}, out: uri, **params) -> StageResult`."""

from arborl.components.stages import evaluate, label, prepare, sample, train, verify, warmstart

STAGES = {
    "prepare": prepare.run,
    "warmstart": warmstart.run,
    "sample": sample.run,
    "verify": verify.run,
    "label": label.run,
    "train": train.run,
    "evaluate": evaluate.run,
}

# The inputs each stage reads (all are URIs of other stages' output directories) and extra parameters.
STAGE_INPUTS = {
    "prepare": (),
    "warmstart": ("world",),
    "sample": ("model", "world"),
    "verify": ("nodes", "world"),
    "label": ("nodes", "rewards", "world"),
    "train": ("model", "nodes", "advantages", "world"),
    "evaluate": ("model", "world"),
}
# Inputs a stage reads only under some settings: train needs `reference` (the frozen KL model) when
# train.kl_coef > 0.
STAGE_OPTIONAL_INPUTS = {"train": ("reference",)}
STAGE_PARAMS = {"sample": ("iteration",), "train": ("iteration",)}
