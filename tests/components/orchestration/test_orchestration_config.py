"""The `orchestration` config section and the config sources a stage process reads: a run's resolved
config.json, locally or by URI (a moto S3 server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arborl.components.artifacts import storage
from arborl.components.config import STAGE_NAMES, Config, ConfigError, OrchestrationConfig, load_config
from arborl.components.stages import STAGES

ROOT = Path(__file__).resolve().parents[3]
MICRO = ROOT / "configs" / "micro.yaml"


def test_defaults_run_in_process_with_gpus_for_the_model_stages():
    orch = Config().orchestration
    assert orch.executor == "inprocess" and orch.dask_address is None and orch.command == ["arborl"]
    assert set(STAGE_NAMES) == set(STAGES)
    assert {s: orch.stage_resources(s).gpus for s in STAGE_NAMES} == {
        "prepare": 0, "warmstart": 1, "sample": 1, "verify": 0, "label": 0, "train": 1, "evaluate": 1}
    assert orch.image("train") == "arborl:latest"
    for name, field in OrchestrationConfig.model_fields.items():
        assert field.description, name


def test_a_partial_resources_entry_keeps_the_other_stages_defaults():
    cfg = load_config(MICRO, ["orchestration.resources={train: {gpus: 4, cpu: 16, memory: 64Gi}}"])
    assert cfg.orchestration.stage_resources("train").model_dump() == {"cpu": "16", "memory": "64Gi", "gpus": 4}
    assert cfg.orchestration.stage_resources("sample").gpus == 1
    assert cfg.orchestration.stage_resources("label").gpus == 0


@pytest.mark.parametrize("override, message", [
    ("orchestration.images={trian: x:1}", "key 'orchestration.images': unknown stage 'trian'"),
    ("orchestration.resources={default: {gpus: 1}}", "key 'orchestration.resources': unknown stage 'default'"),
    ("orchestration.resources={train: {memory: 16GB}}", "key 'orchestration.resources.train.memory': must be bytes"),
    ("orchestration.resources={train: {cpu: two}}", "key 'orchestration.resources.train.cpu': must be a number"),
    ("orchestration.resources={train: {gpus: -1}}", "key 'orchestration.resources.train.gpus'"),
    ("orchestration.env={AWS-KEY: x}", "key 'orchestration.env': 'AWS-KEY' is no environment variable name"),
    ("orchestration.secret_env={AWS_KEY: {name: s3}}", "key 'orchestration.secret_env.AWS_KEY.key'"),
    ("orchestration.executor=slurm", "key 'orchestration.executor'"),
    ("orchestration.container_cli=nerdctl", "key 'orchestration.container_cli'"),
    ("orchestration.container_args=--runtime", "key 'orchestration.container_args'"),
    ("orchestration.command=[]", "key 'orchestration.command': must name at least the program"),
    ("orchestration.volumes=[{mount_path: data, claim: c}]", "mount_path must be absolute"),
    ("orchestration.volumes=[{mount_path: /data}]", "needs host_path (docker) or claim (kubernetes)"),
])
def test_bad_orchestration_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match="micro.yaml: ") as exc:
        load_config(MICRO, [override])
    assert message in str(exc.value)


def test_containers_need_an_image_for_every_stage_and_a_secret_is_no_plain_variable():
    with pytest.raises(ConfigError, match="executor=docker needs an image for prepare, warmstart, verify"):
        load_config(MICRO, ["orchestration.executor=docker", "orchestration.images={sample: s:1, train: t:1, "
                            "evaluate: e:1}"])
    every = "{" + ", ".join(f"{s}: img-{s}:1" for s in STAGE_NAMES) + "}"
    assert load_config(MICRO, ["orchestration.executor=kubernetes", f"orchestration.images={every}"]
                       ).orchestration.image("label") == "img-label:1"
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY set in both env and secret_env"):
        load_config(MICRO, ["orchestration.env={AWS_SECRET_ACCESS_KEY: x}",
                            "orchestration.secret_env={AWS_SECRET_ACCESS_KEY: {name: s3, key: secret}}"])


def test_a_resolved_json_config_loads_like_its_yaml(tmp_path):
    cfg = load_config(MICRO, ["orchestration.executor=subprocess", "sampling.shards=2"])
    path = tmp_path / "config.json"
    storage.write_json(str(path), cfg.model_dump(mode="json"))
    assert load_config(path) == cfg
    assert load_config(str(path), ["run.iterations=7"]).run.iterations == 7

    path.write_text('{"run": {"name": "x"},')
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        load_config(path)
    path.write_text(json.dumps({"orchestration": {"executor": "cluster"}}))
    with pytest.raises(ConfigError, match=f"{path}: key 'orchestration.executor'"):
        load_config(path)


def test_a_config_by_uri_is_read_through_storage(s3_bucket, tmp_path):
    root, _ = s3_bucket
    cfg = load_config(MICRO, [f"run.output_root={root}/runs"])
    uri = f"{root}/runs/micro/config.json"
    storage.write_json(uri, cfg.model_dump(mode="json"))
    assert load_config(uri) == cfg
    storage.write_bytes(f"{root}/configs/micro.yaml", MICRO.read_bytes())  # YAML by URI too
    assert load_config(f"{root}/configs/micro.yaml") == load_config(MICRO)
    with pytest.raises(ConfigError, match=f"config file not found: {root}/runs/other/config.json"):
        load_config(f"{root}/runs/other/config.json")
    with pytest.raises(ConfigError, match="config file not found"):  # a local path keeps its message
        load_config(tmp_path / "nothing.yaml")
