"""training.models: model directories load, and every load error names the directory, the file and what is
wrong (also through `arborl stage`, as one line with exit status 2)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.config import LoraSettings, ModelConfig
from arborl.components.training import lora
from arborl.components.training.models import (
    PICKLED_WEIGHTS_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    build_model,
    build_tokenizer,
    load_policy,
    save_policy,
)
from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[3]
MICRO = str(ROOT / "configs" / "micro.yaml")
TINY = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    tokenizer = build_tokenizer(["alpha", "beta", "gamma"])
    path = tmp_path / "model"
    save_policy(build_model(TINY, tokenizer, seed=0), tokenizer, str(path))
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_saved_model_directory_loads(model_dir):
    model, tokenizer = load_policy(str(model_dir))
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == model.config.vocab_size
    assert model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_weights_name_the_file(model_dir, keep):
    _truncate(model_dir / WEIGHTS_FILE, keep)
    with pytest.raises(ArtifactError) as err:
        load_policy(str(model_dir))
    message = str(err.value)
    assert message.startswith(f"{model_dir / WEIGHTS_FILE}: not a safetensors file or truncated (")
    assert "\n" not in message


def test_directory_without_tokenizer_files_names_them(model_dir):
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(ArtifactError) as err:
        load_policy(str(model_dir))
    assert str(err.value).startswith(f"{model_dir}: no {TOKENIZER_FILE} (")
    assert "sentencepiece" not in str(err.value)


def test_corrupt_tokenizer_names_the_file(model_dir):
    (model_dir / TOKENIZER_FILE).write_text('{"model": ')
    with pytest.raises(ArtifactError) as err:
        load_policy(str(model_dir))
    assert str(err.value).startswith(f"{model_dir / TOKENIZER_FILE}: cannot load the tokenizer (")


def test_non_json_config_names_the_file(model_dir):
    (model_dir / "config.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(ArtifactError) as err:
        load_policy(str(model_dir))
    assert str(err.value).startswith(f"{model_dir / 'config.json'}: not a JSON file or truncated (")


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: not a Hugging Face model directory"):
        load_policy(str(tmp_path / "nowhere"))


class _Payload:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_pickled_weights_are_never_loaded(model_dir, tmp_path):
    marker = tmp_path / "marker"
    weights = {k: v.clone() for k, v in load_policy(str(model_dir))[0].state_dict().items()}
    buffer = io.BytesIO()
    torch.save({**weights, "payload": _Payload(marker)}, buffer)
    (model_dir / WEIGHTS_FILE).unlink()
    (model_dir / PICKLED_WEIGHTS_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(ArtifactError) as err:
        load_policy(str(model_dir))
    assert str(err.value).startswith(f"{model_dir}: no {WEIGHTS_FILE}")
    assert PICKLED_WEIGHTS_FILE in str(err.value)
    assert not marker.exists()


def test_sharded_weights_index_naming_a_missing_shard(model_dir):
    (model_dir / WEIGHTS_FILE).unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ArtifactError, match="model-00001-of-00001.safetensors: missing"):
        load_policy(str(model_dir))


def test_truncated_lora_adapter_names_the_file(model_dir, tmp_path):
    settings = LoraSettings(enabled=True, rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    model, tokenizer, base = lora.load_for_training(str(model_dir), settings)
    out = tmp_path / "lora-model"
    lora.save_trained(model, tokenizer, str(out), base)
    adapter = out / lora.ADAPTER_DIR / lora.ADAPTER_WEIGHTS_FILE
    _truncate(adapter)
    with pytest.raises(ArtifactError) as err:
        lora.load_for_training(str(out), settings)
    assert str(err.value).startswith(f"{adapter}: not a safetensors file or truncated (")
    (out / lora.BASE_FILE).write_text("[]")
    with pytest.raises(ArtifactError, match=f"{out / lora.BASE_FILE}: no 'base' model URI"):
        lora.load_for_training(str(out), settings)


# --- through the command line: one red line, exit status 2, no traceback ------------------------------


def _finished(path: Path, stage: str) -> str:
    storage.makedirs(str(path))
    manifests.write_manifest(str(path), stage=stage, inputs={}, config_hash="test", outputs={}, metrics={},
                           started=time.time())
    return str(path)


def _stage_fails(*args: str) -> str:
    res = CliRunner().invoke(app, ["stage", *args, "--config", MICRO, "run.threads=1"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


def test_cli_names_a_truncated_model_in_one_line(model_dir, tmp_path):
    _truncate(model_dir / WEIGHTS_FILE)
    _finished(model_dir, "warmstart")
    inputs = {name: _finished(tmp_path / name, name) for name in ("nodes", "advantages", "world")}
    args = ["--in", f"model={model_dir}", *[a for k, v in inputs.items() for a in ("--in", f"{k}={v}")]]
    output = _stage_fails("train", *args, "--out", str(tmp_path / "out"))
    lines = [line for line in output.splitlines() if WEIGHTS_FILE in line]
    assert len(lines) == 1
    assert "unreadable artifact" in lines[0] and str(model_dir / WEIGHTS_FILE) in lines[0]
    assert "truncated" in lines[0]


def test_cli_names_a_truncated_parquet_in_one_line(tmp_path):
    nodes = Path(_finished(tmp_path / "sample", "sample"))
    schemas.write([], schemas.NODES, str(nodes / schemas.NODES_FILE))
    _truncate(nodes / schemas.NODES_FILE)
    world = _finished(tmp_path / "prepare", "prepare")
    output = _stage_fails("verify", "--in", f"nodes={nodes}", "--in", f"world={world}", "--out", str(tmp_path / "v"))
    lines = [line for line in output.splitlines() if schemas.NODES_FILE in line]
    assert len(lines) == 1
    assert f"{nodes / schemas.NODES_FILE}: not a Parquet file or truncated" in lines[0]


def test_a_hub_id_that_is_no_local_directory_and_cannot_be_downloaded_names_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: the Hub says no
    with pytest.raises(ArtifactError, match="nosuchorg/nosuchmodel: no such local directory, and not downloadable"):
        load_policy("nosuchorg/nosuchmodel")


def test_load_policy_in_bfloat16(tmp_path, tokenizer):
    from arborl.components.config import ModelConfig

    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tokenizer, 0)
    save_policy(model, tokenizer, str(tmp_path / "m"))
    loaded, _ = load_policy(str(tmp_path / "m"), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_prompt_ids_put_bos_only_where_the_tokenizer_has_one(tokenizer):
    from arborl.components.training.models import prompt_ids, row_prompt_ids

    ids = prompt_ids(tokenizer, "<question> x </question>")
    assert ids[0] == tokenizer.bos_token_id
    row = {"prompt": "ignored", "messages": json.dumps([{"role": "user", "content": "<question> x </question>"}])}
    assert row_prompt_ids(tokenizer, row) == ids  # no chat template: the content as plain text after BOS
