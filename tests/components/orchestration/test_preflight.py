"""components.preflight: a missing model, a tokenizer-less directory, a chat template that ignores
add_generation_prompt, a retriever that is down and a data file without its columns are each one line naming the
key and value, in seconds; a good setup has none. And `arborl config --check` / `arborl run` say so on stderr."""

from __future__ import annotations

import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from arborl.components.config import Config
from arborl.components.orchestration.preflight import preflight
from arborl.flows.cli import app
from tests.models_bpe import CHAT_TEMPLATE, bpe_tokenizer

BROKEN_TEMPLATE = CHAT_TEMPLATE.split("{%- if add_generation_prompt %}")[0]  # never opens the assistant turn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(path, template: str):
    tok = bpe_tokenizer(["alice was born in paris", "bob works for acme"] * 20, vocab_size=300)
    tok.chat_template = template
    tok.save_pretrained(str(path))
    return str(path)


def _cfg(**sections) -> Config:
    return Config.model_validate(sections)


def test_model_problems_are_named(tmp_path):
    good = _model_dir(tmp_path / "good", CHAT_TEMPLATE)
    assert preflight(_cfg(model={"path": good})) == []
    assert preflight(_cfg(model={"path": str(tmp_path / "nope")})) == [f"model.path={str(tmp_path / 'nope')!r}: "
                                                                       "no such directory"]
    (tmp_path / "empty").mkdir()
    (problem,) = preflight(_cfg(model={"path": str(tmp_path / "empty")}))
    assert problem.startswith("model.path=") and "holds no tokenizer" in problem
    broken = _model_dir(tmp_path / "broken", BROKEN_TEMPLATE)
    (problem,) = preflight(_cfg(model={"path": broken}))
    assert f"model.path={broken!r}" in problem and "ignores add_generation_prompt" in problem
    assert preflight(_cfg(model={"path": broken, "chat_template": "none"})) == []  # plain-text prompts: fine
    assert preflight(_cfg(model={"path": "Qwen/Qwen2.5-3B-Instruct"})) == []  # a Hub id is not checked here


def test_a_retriever_that_is_down_and_bad_data_files_are_named_in_seconds(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    (problem,) = preflight(_cfg(search={"backend": "http", "url": url}))
    assert time.monotonic() - started < 10
    assert problem.startswith(f"search.url={url!r}: the retriever does not answer a probe query")
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(pa.table({"data_source": ["nq"], "prompt": ["q"], "reward_model": ["{}"]}), good)
    pq.write_table(pa.table({"data_source": ["nq"], "prompt": ["q"]}), bad)
    data = {"source": "parquet", "train_files": [str(good), str(tmp_path / "gone.parquet")], "test_files": [str(bad)]}
    problems = preflight(_cfg(data=data, search={"backend": "http", "url": url}, warmstart={"enabled": False},
                              model={"path": _model_dir(tmp_path / "m", CHAT_TEMPLATE)}))
    assert problems[1:] == [f"data.train_files: {str(tmp_path / 'gone.parquet')!r}: no such file",
                            f"data.test_files: {str(bad)!r}: missing required column(s) reward_model"]
    assert problems[0] == problem


def test_the_cli_checks_before_anything_runs(tmp_path):
    broken = _model_dir(tmp_path / "broken", BROKEN_TEMPLATE)
    runner = CliRunner()
    res = runner.invoke(app, ["config", "--check", f"model.path={broken}"])
    assert res.exit_code == 2 and "ignores add_generation_prompt" in res.stderr
    res = runner.invoke(app, ["run", f"model.path={tmp_path / 'nope'}", f"run.output_root={tmp_path / 'runs'}"])
    assert res.exit_code == 2 and "no such directory" in res.stderr and not (tmp_path / "runs").exists()
    assert runner.invoke(app, ["config", "--check"]).exit_code == 0
