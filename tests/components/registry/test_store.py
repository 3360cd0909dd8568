"""registry.store and registry.promotion against a real SQLite MLflow store: one version per run, the model kept
in the run's own experiment and artifact location, nothing written to the working directory."""

from __future__ import annotations

from pathlib import Path

from arborl.components.artifacts import storage
from arborl.components.registry.gate import CHALLENGER
from arborl.components.registry.store import register_final_model, run_versions
from arborl.components.training.models import save_policy


def test_registering_twice_for_one_run_gives_one_version(tracked_run):
    cfg, run_id, model_dir, client, _ = tracked_run
    first = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5})
    # a rerun (resumed run, or a crash after registering): the same version comes back, no new one is made
    client.delete_registered_model_alias(cfg.registry.model_name, CHALLENGER)
    again = register_final_model(cfg, run_id, model_dir, {"test_em": 0.75})
    assert first == again == "1"
    versions = client.search_model_versions(f"name='{cfg.registry.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert [str(v.version) for v in run_versions(client, cfg.registry.model_name, run_id)] == ["1"]
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, CHALLENGER).version) == "1"
    assert client.get_model_version(cfg.registry.model_name, "1").tags["eval.test_em"] == "0.75"
    # a second run of the same model name gets its own version
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    assert register_final_model(cfg, other, model_dir, {"test_em": 0.5}) == "2"


def test_the_model_stays_in_the_runs_experiment_and_nothing_lands_in_the_working_directory(tracked_run, tmp_path):
    cfg, run_id, model_dir, client, cwd = tracked_run
    version = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5})
    mv = client.get_model_version(cfg.registry.model_name, version)
    logged = client.get_logged_model(mv.model_id or mv.source.split("/")[-1])
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert logged.experiment_id == experiment.experiment_id == client.get_run(run_id).info.experiment_id
    assert logged.source_run_id == run_id
    location = Path(storage.filesystem(logged.artifact_location)[1])
    assert location.is_relative_to((tmp_path / "runs").resolve()), location
    assert (location / "model" / "model.safetensors").exists()
    assert not (cwd / "mlruns").exists() and not (cwd / "mlflow.db").exists()
    assert list(cwd.iterdir()) == []


def test_a_version_is_tagged_with_its_weights_and_other_weights_are_another_version(tracked_run, tmp_path,
                                                                                    tokenizer, tiny_model):
    """The same run registering other weights at the same place (a rerun after a change) gets a new version, each
    tagged with the digest of the weights it was registered from; the same weights come back as the same one."""
    import torch

    from arborl.components.registry.store import weights_digest
    from arborl.components.tracking.tags import WEIGHTS_TAG

    cfg, run_id, model_dir, client, _ = tracked_run
    first = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5})
    digest = weights_digest(model_dir)
    assert client.get_model_version(cfg.registry.model_name, first).tags[WEIGHTS_TAG] == digest
    assert register_final_model(cfg, run_id, model_dir, {"test_em": 0.5}) == first
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    save_policy(tiny_model, tokenizer, model_dir)
    assert weights_digest(model_dir) != digest
    second = register_final_model(cfg, run_id, model_dir, {"test_em": 0.6})
    assert second != first
    assert client.get_model_version(cfg.registry.model_name, second).tags[WEIGHTS_TAG] == weights_digest(model_dir)
