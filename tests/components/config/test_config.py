"""components.config: YAML files, strict validation with messages naming file and key, overrides, hashes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from arborl.components.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    choices,
    config_from_dict,
    load_config,
    parse_override,
)

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_config_files_to_check():
    assert DEFAULT_CONFIG in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_keeps_its_values(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text()) or {}
    dumped = cfg.model_dump()
    for section, values in raw.items():
        for key, value in (values or {}).items():
            assert dumped[section][key] == value, f"{path.name}: {section}.{key}"


def test_default_config_is_tiny_yaml():
    assert load_config() == load_config(DEFAULT_CONFIG)


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_unknown_key_names_key_and_file(tmp_path):
    data = _tiny()
    data["run"]["colour"] = "red"
    path = _write(tmp_path, data, "typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "run.colour" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_names_section_and_file(tmp_path):
    data = _tiny()
    data["sampler"] = {"temperature": 1.0}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'sampler'" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("run", "iterations", "abc"), ("run", "iterations", -1), ("train", "lr", "fast"), ("run", "device", "tpu"),
     ("sampling", "keep_leaves", 0), ("tracking", "enabled", "perhaps")],
)
def test_mistyped_value_names_key_and_file(tmp_path, section, key, value):
    data = _tiny()
    data[section][key] = value
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{section}.{key}" in str(err.value)
    assert str(path) in str(err.value)


def test_bad_hop_mix_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="hop_mix"):
        load_config(DEFAULT_CONFIG, ["world.hop_mix={5: 1.0}"])


def test_missing_file_and_invalid_yaml_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(listing)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_file_is_an_error_not_a_default_run(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(path)


def test_a_file_with_one_section_fills_the_rest_with_defaults(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("run:\n  iterations: 3\n")
    assert load_config(path) == Config(run={"iterations": 3})


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("train.clip_low=5", "train.clip_low", "less than 1"),
        ("train.clip_low=0", "train.clip_low", "greater than 0"),
        ("train.clip_high=50", "train.clip_high", "less than or equal to 1"),
        ("run.iterations=true", "run.iterations", "valid integer"),
        ("run.seed=1.5", "run.seed", "valid integer"),
        ("run.iterations='3'", "run.iterations", "valid integer"),
        ("advantage.export_preferences=1", "advantage.export_preferences", "valid boolean"),
        ("registry.enabled=yes_please", "registry.enabled", "valid boolean"),
        ("train.lr=.inf", "train.lr", "finite number"),
        ("train.lr=2", "train.lr", "less than 1"),
        ("sampling.temperature=0", "sampling.temperature", "greater than 0"),
    ],
)
def test_values_are_not_coerced_and_ranges_hold(override, key, message):
    with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}': .*{message}"):
        load_config(None, [override])


def test_a_number_in_exponent_form_is_a_number():
    """YAML 1.1 reads 1e-3 (no dot) as a string; the config reads it as the number it means."""
    cfg = load_config(None, ["train.lr=1e-3", "warmstart.lr=2E-4"])
    assert cfg.train.lr == 0.001 and cfg.warmstart.lr == 0.0002


def test_an_integer_is_a_valid_float_and_json_round_trips():
    cfg = load_config(None, ["train.dual_clip=3", "world.hop_mix={1: 1, 2: 1}"])
    assert cfg.train.dual_clip == 3.0
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # hop counts come back from JSON strings


def test_cross_key_checks_name_their_keys():
    with pytest.raises(ConfigError, match=r"model.hidden_size 128 must be a multiple of model.num_heads 3"):
        load_config(None, ["model.num_heads=3"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.b=3", ("a.b", 3)),
        ("a.b=0.25", ("a.b", 0.25)),
        ("a.b=null", ("a.b", None)),
        ("a.b=true", ("a.b", True)),
        ("a.b=[1, 2]", ("a.b", [1, 2])),
        ("a.b={1: 0.5}", ("a.b", {1: 0.5})),
        ("a.b=word", ("a.b", "word")),
        ("a.b=x=y", ("a.b", "x=y")),
        ("a.b=", ("a.b", "")),
        (" a.b =7", ("a.b", 7)),
    ],
)
def test_parse_override_uses_yaml_typing(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["no_equals_sign", "=3"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_overrides_apply_with_yaml_typing():
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            "run.iterations=7",
            "train.lr=0.01",
            "warmstart.lr=1e-3",
            "sampling.keep_leaves=3",
            "tracking.mlflow_uri=null",
            "tracking.enabled=false",
            "run.name=other",
            "world.hop_mix={2: 1.0}",
        ],
    )
    assert cfg.run.iterations == 7 and isinstance(cfg.run.iterations, int)
    assert cfg.train.lr == 0.01
    assert cfg.warmstart.lr == pytest.approx(1e-3)
    assert cfg.sampling.keep_leaves == 3
    assert cfg.tracking.mlflow_uri is None
    assert cfg.tracking.enabled is False
    assert cfg.run.name == "other"
    assert cfg.world.hop_mix == {2: 1.0}
    # untouched keys keep the file's values
    assert cfg.run.eval_every == _tiny()["run"]["eval_every"]


def test_later_override_wins_and_null_resets():
    cfg = load_config(DEFAULT_CONFIG, ["sampling.keep_leaves=3", "sampling.keep_leaves=null"])
    assert cfg.sampling.keep_leaves is None


@pytest.mark.parametrize(("override", "named"), [("run.colour=red", "run.colour"), ("nosuch.key=1", "nosuch")])
def test_override_of_unknown_key_errors(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, [override])
    assert named in str(err.value)


def test_override_into_a_scalar_errors():
    with pytest.raises(ConfigError, match="run.iterations.x"):
        load_config(DEFAULT_CONFIG, ["run.iterations.x=1"])


def test_mistyped_override_names_key():
    with pytest.raises(ConfigError, match="run.iterations"):
        load_config(DEFAULT_CONFIG, ["run.iterations=abc"])


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError, match="<mine>: unknown key 'train.nope'"):
        config_from_dict({"train": {"nope": 1}}, source="<mine>")


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.run.iterations = "abc"


def test_section_hash_tracks_only_its_sections():
    base = Config()
    lr = config_from_dict({"train": {"lr": 0.123}})
    temp = config_from_dict({"sampling": {"temperature": 0.5}})

    assert base.section_hash("train") == Config().section_hash("train")  # stable
    assert base.section_hash("train") != lr.section_hash("train")
    assert base.section_hash("train") == temp.section_hash("train")
    assert base.section_hash("sampling", "agent") != temp.section_hash("sampling", "agent")
    assert base.section_hash("sampling", "agent") == lr.section_hash("sampling", "agent")
    # all sections when none are named
    assert base.section_hash() != lr.section_hash()
    assert base.section_hash() != temp.section_hash()
    # ... except where the stages run, which does not change what they make
    assert base.section_hash() == config_from_dict({"orchestration": {"executor": "subprocess"}}).section_hash()
    # extra params and the seed are part of the hash
    assert base.section_hash("train", iteration=1) != base.section_hash("train", iteration=2)
    assert base.section_hash("train", iteration=1) == Config().section_hash("train", iteration=1)
    assert base.section_hash("train") != config_from_dict({"run": {"seed": 5}}).section_hash("train")
    # the section list matters
    assert base.section_hash("train") != base.section_hash("train", "agent")


def test_section_hash_of_unknown_section_errors():
    with pytest.raises(KeyError):
        Config().section_hash("nosuch")


def test_budget_section_rejects_two_budgets_and_unknown_policies(tmp_path):
    data = _tiny()
    data["budget"].update(tokens_per_prompt=400, chains_per_prompt=4)
    with pytest.raises(ConfigError, match="budget.*at most one"):
        load_config(_write(tmp_path, data))
    data = _tiny()
    data["sampling"]["expansion_policy"] = "greedy"
    with pytest.raises(ConfigError, match="sampling.expansion_policy"):
        load_config(_write(tmp_path, data))
    assert load_config(None, ["budget.chains_per_prompt=8", "agent.node_mode=segment"]).budget.chains_per_prompt == 8


# --- advantage.estimator: names from the estimator registry, checked against the train section -----------------


def test_every_registered_estimator_is_accepted():
    from arborl.components.advantages.registry import estimator_names

    names = estimator_names()
    assert {"tree", "tree_intra", "tree_inter", "grpo", "dr_grpo", "process"} <= set(names)
    for name in names:
        assert config_from_dict({"advantage": {"estimator": name}}).advantage.estimator == name
        assert choices.check_value("advantage.estimator", name) == name  # the registry's own check


def test_a_choice_no_registry_checks_is_an_error_not_a_pass():
    with pytest.raises(RuntimeError, match="no registry checks 'agent.tool'"):
        choices.check_value("agent.tool", "search")


def test_unknown_estimator_names_the_key_and_the_choices(tmp_path):
    from arborl.components.advantages.registry import estimator_names

    data = _tiny()
    data["advantage"]["estimator"] = "ppo"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    msg = str(err.value)
    assert "'advantage.estimator'" in msg and "'ppo'" in msg and str(tmp_path) in msg
    assert ", ".join(estimator_names()) in msg
    with pytest.raises(ConfigError, match="advantage.estimator.*choose one of"):
        load_config(None, ["advantage.estimator=Tree"])


@pytest.mark.parametrize(("override", "named"), [
    ("train.form=duplicated", "train.form 'packed', got 'duplicated'"),
    ("train.loss_aggregation=seq-mean-token-mean", "train.loss_aggregation 'token-mean', got 'seq-mean-token-mean'"),
    ("train.loss_aggregation=seq-mean-token-sum-norm", "train.loss_aggregation 'token-mean', got 'seq-mean-token-sum"),
])
def test_process_estimator_with_training_it_cannot_use_fails_at_validation(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["advantage.estimator=process", override])
    msg = str(err.value)
    assert "advantage.estimator 'process' needs " + named in msg
    key, value = override.removeprefix("train.").split("=")
    with pytest.raises(ConfigError, match="advantage.estimator 'process' needs train"):
        config_from_dict({"advantage": {"estimator": "process"}, "train": {key: value}})
    # the same training settings are fine with a per-leaf estimator, and process trains packed with token-mean
    assert load_config(None, ["advantage.estimator=grpo", override]).advantage.estimator == "grpo"
    cfg = load_config(None, ["advantage.estimator=process", "train.form=packed", "train.loss_aggregation=token-mean"])
    assert cfg.advantage.estimator == "process"


def test_an_estimator_registered_later_is_accepted_and_checked():
    from arborl.components.advantages.registry import register_estimator, unregister_estimator

    register_estimator("config_probe", kind="leaf", help="probe", form="duplicated")(lambda rewards, parents, eps: {})
    try:
        cfg = config_from_dict({"advantage": {"estimator": "config_probe"}, "train": {"form": "duplicated"}})
        assert cfg.advantage.estimator == "config_probe"
        with pytest.raises(ConfigError, match="advantage.estimator 'config_probe' needs train.form 'duplicated'"):
            config_from_dict({"advantage": {"estimator": "config_probe"}})
    finally:
        unregister_estimator("config_probe")
    with pytest.raises(ConfigError, match="advantage.estimator"):
        config_from_dict({"advantage": {"estimator": "config_probe"}, "train": {"form": "duplicated"}})


@pytest.mark.parametrize("name", ["", ".", "..", "../../escaped", "a/b", "/abs", "a\\b", " tiny", "tiny ", "my run",
                                  "tab\tname", "naïve", "x:y", "*"])
def test_run_name_must_be_a_plain_name(name):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"run": {"name": name}})
    msg = str(err.value)
    assert "run.name" in msg and "plain name" in msg and repr(name) in msg
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, [f"run.name='{name}'"])  # quoted: YAML keeps the spaces


@pytest.mark.parametrize("name", ["tiny", "micro-2", "exp_3.seed0", "A.b-C_9", "...x"])
def test_run_name_plain_names_pass(name):
    assert config_from_dict({"run": {"name": name}}).run.name == name


@pytest.mark.parametrize("override, message", [
    ("run.iterations=1:30", "run.iterations"),  # YAML 1.1 would read 90
    ("run.iterations=0x10", "run.iterations"),  # YAML 1.1 would read 16
    ("tracking.enabled=yes", "tracking.enabled"),  # YAML 1.1 would read true
    ("run.seed=99999999999999999999999", "outside the 64-bit integer range"),
])
def test_yaml_surprises_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(DEFAULT_CONFIG, [override])


def test_yaml_1_2_numbers():
    assert load_config(DEFAULT_CONFIG, ["run.iterations=010"]).run.iterations == 10  # decimal, not octal
    assert load_config(DEFAULT_CONFIG, ["train.lr=1e-3"]).train.lr == 0.001


def test_a_duplicate_key_or_non_utf8_file_is_a_named_error(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("run:\n  iterations: 3\n  iterations: 4\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: duplicate key 'iterations' \(first at line 2\)"):
        load_config(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not UTF-8 text \(byte 16"):
        load_config(latin)
