"""The pipeline's stages. Each is `run(cfg, inputs: {name: uri}, out: uri, **params) -> StageResult`; the inputs
each reads and the result are typed in `contract.py`."""

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
