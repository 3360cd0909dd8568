"""stages.contract: typed stage inputs (a missing or unknown one is named) and the result's dict and manifest forms."""

from __future__ import annotations

import json

import pytest

from arborl.components.stages import STAGES
from arborl.components.stages.contract import (
    INPUTS,
    MissingInput,
    StageResult,
    TrainInputs,
    inputs_of,
)


def test_every_stage_has_an_input_record():
    assert set(INPUTS) == set(STAGES)
    assert INPUTS["prepare"].required() == ()
    assert INPUTS["label"].required() == ("nodes", "rewards", "world")
    assert TrainInputs.required() == ("model", "nodes", "advantages", "world")
    assert TrainInputs.optional() == ("reference",)


def test_inputs_are_typed_and_round_trip_to_uris():
    uris = {"model": "runs/t/iter_001/train", "nodes": "n", "advantages": "a", "world": "w"}
    given = inputs_of("train", uris)
    assert isinstance(given, TrainInputs) and given.nodes == "n" and given.reference is None
    assert given.as_uris() == uris  # the optional reference, not given, is not listed
    assert inputs_of("train", {**uris, "reference": "r"}).as_uris()["reference"] == "r"


def test_a_missing_or_unknown_input_names_the_stage_and_the_key():
    with pytest.raises(MissingInput, match=r"stage 'verify': missing \['nodes'\] inputs; it reads nodes, world"):
        inputs_of("verify", {"world": "w"})
    with pytest.raises(MissingInput, match=r"stage 'evaluate': unknown \['nodes'\] inputs"):
        inputs_of("evaluate", {"model": "m", "world": "w", "nodes": "n"})
    with pytest.raises(MissingInput, match=r"\(optional: reference\)"):
        inputs_of("train", {"model": "m"})
    with pytest.raises(KeyError):  # the CLI's error policy reads it as a user-input error
        inputs_of("sample", {})


def test_a_result_round_trips_through_json_and_reads_from_a_manifest():
    result = StageResult("label", "runs/t/iter_002/label", {"advantages": "runs/t/iter_002/label/advantages.parquet"},
                         {"preference_pairs": 60}, 0.12, False)
    assert StageResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    manifest = {"stage": "label", "inputs": {}, "outputs": result.outputs, "metrics": result.metrics,
                "seconds": 0.12, "config_hash": "x"}
    found = StageResult.from_manifest(result.out, manifest)
    assert found.skipped and found.metrics == {"preference_pairs": 60} and found.seconds == 0.12
    assert StageResult.from_manifest(result.out, manifest, skipped=False) == result
