"""The `data` config section: synthetic by default; parquet needs train and test files."""

from __future__ import annotations

import pytest

from arborl.components.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_synthetic_with_no_files():
    data = Config().data
    assert (data.source, data.train_files, data.val_files, data.test_files) == ("synthetic", [], [], [])
    assert (data.max_bad_fraction, data.batch_rows) == (0.01, 4096)
    assert load_config().data == data


BYO = {"search": {"backend": "http", "url": "http://127.0.0.1:8000"}, "warmstart": {"enabled": False},
       "model": {"path": "some/model"}}


def test_parquet_needs_train_and_test_files():
    with pytest.raises(ConfigError, match="data.source=parquet needs non-empty data.train_files and data.test_files"):
        config_from_dict({"data": {"source": "parquet", "train_files": ["train.parquet"]}, **BYO})
    cfg = config_from_dict({"data": {"source": "parquet", "train_files": ["a.parquet", "s3://b/c.parquet"],
                                     "test_files": ["t.parquet"]}, **BYO})
    assert cfg.data.val_files == []


@pytest.mark.parametrize(("missing", "message"), [
    ("search", "search.backend is 'fts'"),
    ("warmstart", "warmstart.enabled is true"),
])
def test_parquet_needs_an_http_retriever_and_no_warm_start(missing, message):
    data = {"data": {"source": "parquet", "train_files": ["a.parquet"], "test_files": ["t.parquet"]}, **BYO}
    del data[missing]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


@pytest.mark.parametrize(("override", "key"), [
    ("data.source=hdf5", "data.source"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("data.batch_rows=0", "data.batch_rows"),
    ("data.train_files=train.parquet", "data.train_files"),  # a list, not a string
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"key '{key}'"):
        load_config(None, [override])
