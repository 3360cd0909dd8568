"""components.storage: atomic writes, JSON/Parquet helpers, stage manifests via run_stage, S3 round trip."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from arborl.components import schemas, storage
from arborl.components.config import Config, config_from_dict
from arborl.components.stages.base import run_stage

# --- local files -----------------------------------------------------------------------------------


def test_write_bytes_creates_parents_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b" / "blob.bin"
    payload = os.urandom(1 << 16)
    storage.write_bytes(str(target), payload)
    assert target.read_bytes() == payload
    assert os.listdir(target.parent) == ["blob.bin"]

    storage.write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["blob.bin"]
    assert storage.read_bytes(str(target)) == b"second"


def test_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "blob.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # fails while writing the temporary file
    assert target.read_bytes() == b"old"


def test_failed_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "blob.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")
    assert sorted(os.listdir(tmp_path)) == ["blob.bin"]


def test_json_and_parquet_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"nested": "x"}}
    storage.write_json(str(tmp_path / "o.json"), obj)
    assert storage.read_json(str(tmp_path / "o.json")) == obj

    table = pa.table({"x": pa.array([1, 2, 3], pa.int32()), "y": ["a", "b", None]})
    storage.write_parquet(table, str(tmp_path / "t.parquet"))
    assert storage.read_parquet(str(tmp_path / "t.parquet")).equals(table)


def test_read_parquet_of_missing_file_names_it(tmp_path):
    uri = str(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        storage.read_parquet(uri)


def test_join_and_is_local():
    assert storage.join("s3://b/p/", "x", "/y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.is_local("/tmp/a") and storage.is_local("rel/path") and storage.is_local("file:///tmp/a")
    assert not storage.is_local("s3://bucket/key")


def test_exists_remove_makedirs(tmp_path):
    d = str(tmp_path / "d" / "e")
    assert not storage.exists(d)
    storage.makedirs(d)
    assert storage.exists(d)
    storage.write_bytes(storage.join(d, "f"), b"1")
    storage.remove(str(tmp_path / "d"))
    assert not storage.exists(str(tmp_path / "d"))
    storage.remove(str(tmp_path / "d"))  # removing nothing is fine


def test_upload_dir_and_local_dir_on_local_paths(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    storage.upload_dir(src, str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "a.txt").read_text() == "A"
    assert (tmp_path / "dst" / "sub" / "b.txt").read_text() == "B"
    storage.upload_dir(src, str(src))  # same directory: a no-op, not a self-copy
    assert sorted(p.name for p in src.rglob("*")) == ["a.txt", "b.txt", "sub"]
    assert storage.local_dir(str(tmp_path / "dst")) == tmp_path / "dst"


# --- run_stage and manifests -------------------------------------------------------------------------


class Body:
    """A stage body that counts its calls and writes one file under `out`."""

    def __init__(self, out: str):
        self.out = out
        self.calls = 0

    def __call__(self):
        self.calls += 1
        uri = storage.join(self.out, "data.json")
        storage.write_json(uri, {"call": self.calls})
        return {"data": uri}, {"calls": self.calls}


def _input(tmp_path, name: str = "world") -> str:
    uri = str(tmp_path / name)
    run_stage("prepare", Config(), {}, uri, ("world",), Body(uri))
    return uri


def test_run_stage_runs_once_then_skips(tmp_path):
    cfg = Config()
    inputs = {"world": _input(tmp_path)}
    out = str(tmp_path / "out")
    body = Body(out)

    first = run_stage("train", cfg, inputs, out, ("train",), body, iteration=1)
    assert body.calls == 1 and not first.skipped
    manifest = storage.read_manifest(out)
    assert manifest["stage"] == "train"
    assert manifest["inputs"] == inputs
    assert manifest["config_hash"] == cfg.section_hash("train", iteration=1)
    assert manifest["outputs"] == {"data": storage.join(out, "data.json")}
    assert manifest["metrics"] == {"calls": 1}
    assert manifest["code_version"] == storage.CODE_VERSION

    second = run_stage("train", Config(), dict(inputs), out, ("train",), body, iteration=1)
    assert body.calls == 1 and second.skipped
    assert second.outputs == first.outputs and second.metrics == first.metrics
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 1}


def test_run_stage_reruns_when_config_section_params_or_inputs_change(tmp_path):
    world = _input(tmp_path, "world")
    other_world = _input(tmp_path, "world2")
    out = str(tmp_path / "out")
    body = Body(out)

    run_stage("train", Config(), {"world": world}, out, ("train",), body, iteration=1)
    assert body.calls == 1
    # another section changed: still done
    other_section = config_from_dict({"sampling": {"temperature": 0.3}})
    assert run_stage("train", other_section, {"world": world}, out, ("train",), body, iteration=1).skipped
    assert body.calls == 1
    # its own section changed
    changed = config_from_dict({"train": {"lr": 0.1}})
    assert not run_stage("train", changed, {"world": world}, out, ("train",), body, iteration=1).skipped
    assert body.calls == 2
    assert run_stage("train", changed, {"world": world}, out, ("train",), body, iteration=1).skipped
    # params changed
    run_stage("train", changed, {"world": world}, out, ("train",), body, iteration=2)
    assert body.calls == 3
    # inputs changed
    run_stage("train", changed, {"world": other_world}, out, ("train",), body, iteration=2)
    assert body.calls == 4
    # another stage name at the same place
    run_stage("label", changed, {"world": other_world}, out, ("train",), body, iteration=2)
    assert body.calls == 5
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 5}


def test_half_written_output_is_wiped_and_rerun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"half")
    (out / "sub").mkdir()
    (out / "sub" / "junk").write_text("x")
    body = Body(str(out))
    result = run_stage("prepare", Config(), {}, str(out), ("world",), body)
    assert body.calls == 1 and not result.skipped
    assert sorted(p.name for p in out.iterdir()) == [storage.MANIFEST, "data.json"]


def test_stale_manifest_output_is_wiped_before_rerun(tmp_path):
    out = tmp_path / "out"
    body = Body(str(out))
    run_stage("prepare", Config(), {}, str(out), ("world",), body)
    (out / "leftover.txt").write_text("from the old run")
    run_stage("prepare", config_from_dict({"world": {"num_people": 50}}), {}, str(out), ("world",), body)
    assert body.calls == 2
    assert not (out / "leftover.txt").exists()


def test_failed_body_writes_no_manifest_and_reruns(tmp_path):
    out = str(tmp_path / "out")

    def broken():
        storage.write_json(storage.join(out, "partial.json"), {})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage("prepare", Config(), {}, out, ("world",), broken)
    assert storage.read_manifest(out) is None
    body = Body(out)
    assert not run_stage("prepare", Config(), {}, out, ("world",), body).skipped
    assert body.calls == 1
    assert not storage.exists(storage.join(out, "partial.json"))


def test_input_without_manifest_is_an_error_naming_it(tmp_path):
    half = tmp_path / "nodes"
    half.mkdir()
    (half / "nodes.parquet").write_bytes(b"partial")
    out = str(tmp_path / "out")
    body = Body(out)
    with pytest.raises(FileNotFoundError) as err:
        run_stage("label", Config(), {"nodes": str(half)}, out, ("advantage",), body)
    assert "'nodes'" in str(err.value) and str(half) in str(err.value)
    assert body.calls == 0
    missing = str(tmp_path / "never")
    with pytest.raises(FileNotFoundError, match="never"):
        run_stage("label", Config(), {"rewards": missing}, out, ("advantage",), body)
    assert body.calls == 0


def test_completed_checks_every_field(tmp_path):
    out = str(tmp_path / "o")
    storage.makedirs(out)
    assert storage.completed(out, stage="s", inputs={}, config_hash="h") is None
    storage.write_manifest(out, stage="s", inputs={"a": "x"}, config_hash="h", outputs={}, metrics={}, started=0.0)
    assert storage.completed(out, stage="s", inputs={"a": "x"}, config_hash="h") is not None
    assert storage.completed(out, stage="t", inputs={"a": "x"}, config_hash="h") is None
    assert storage.completed(out, stage="s", inputs={"a": "y"}, config_hash="h") is None
    assert storage.completed(out, stage="s", inputs={"a": "x"}, config_hash="g") is None
    manifest = storage.read_json(storage.manifest_uri(out))
    manifest["code_version"] = "0.0.0"
    storage.write_json(storage.manifest_uri(out), manifest)
    assert storage.completed(out, stage="s", inputs={"a": "x"}, config_hash="h") is None


# --- S3 through a local moto server ------------------------------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    boto3 = pytest.importorskip("boto3")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="arborl-test")
    yield "s3://arborl-test", client
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_round_trip(s3_bucket, tmp_path):
    root, client = s3_bucket
    base = storage.join(root, "run")

    # parquet and json
    table = pa.table({"x": pa.array([1, 2, 3], pa.int64()), "s": ["a", None, "c"]})
    storage.write_parquet(table, storage.join(base, "t.parquet"))
    assert storage.read_parquet(storage.join(base, "t.parquet")).equals(table)
    storage.write_json(storage.join(base, "o.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(base, "o.json")) == {"k": [1, 2]}
    # the object really is in the bucket, under the expected key
    body = client.get_object(Bucket="arborl-test", Key="run/o.json")["Body"].read()
    assert json.loads(body) == {"k": [1, 2]}
    assert storage.exists(storage.join(base, "t.parquet"))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        storage.read_parquet(storage.join(base, "nope.parquet"))

    # schemas over s3
    rows = [{"doc_id": 0, "subject": "s", "relation": "r", "object": "o", "text": "s r o ."}]
    schemas.write(rows, schemas.FACTS, storage.join(base, "facts.parquet"))
    assert schemas.read(storage.join(base, "facts.parquet"), schemas.FACTS).to_pylist() == rows

    # manifests
    assert storage.read_manifest(storage.join(base, "stage")) is None
    storage.write_manifest(storage.join(base, "stage"), stage="s", inputs={"a": "b"}, config_hash="h",
                           outputs={"o": "x"}, metrics={"m": 1.5}, started=0.0)
    manifest = storage.read_manifest(storage.join(base, "stage"))
    assert manifest["stage"] == "s" and manifest["metrics"] == {"m": 1.5}
    assert storage.completed(storage.join(base, "stage"), stage="s", inputs={"a": "b"}, config_hash="h")

    # directories: upload, then fetch a local copy
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    storage.upload_dir(src, storage.join(base, "model"))
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="arborl-test", Prefix="run/model/")["Contents"])
    assert keys == ["run/model/config.json", "run/model/sub/weights.bin"]
    local = storage.local_dir(storage.join(base, "model"), cache_root=tmp_path / "cache")
    assert (local / "config.json").read_text() == '{"a": 1}'
    assert (local / "sub" / "weights.bin").read_bytes() == bytes(range(256))
    assert storage.local_dir(storage.join(base, "model"), cache_root=tmp_path / "cache") == local  # cached

    storage.remove(storage.join(base, "model"))
    assert not storage.exists(storage.join(base, "model", "config.json"))


def test_local_dir_sees_a_rewritten_remote_directory(s3_bucket, tmp_path):
    root, _ = s3_bucket
    uri = storage.join(root, "run", "model")
    src = tmp_path / "v1"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"version 1")
    storage.upload_dir(src, uri)
    cache = tmp_path / "cache"
    assert (storage.local_dir(uri, cache_root=cache) / "weights.bin").read_bytes() == b"version 1"
    # the stage that made it runs again (e.g. after a config change): its output is wiped and rewritten
    storage.prepare_output(uri)
    (src / "weights.bin").write_bytes(b"version 2")
    storage.upload_dir(src, uri)
    assert storage.read_bytes(storage.join(uri, "weights.bin")) == b"version 2"
    assert (storage.local_dir(uri, cache_root=cache) / "weights.bin").read_bytes() == b"version 2"


def test_local_dir_keeps_different_uris_apart(s3_bucket, tmp_path):
    root, _ = s3_bucket
    for name, content in (("run_1/model", b"first"), ("run/1/model", b"second")):
        src = tmp_path / name.replace("/", "-")
        src.mkdir()
        (src / "weights.bin").write_bytes(content)
        storage.upload_dir(src, storage.join(root, name))
    cache = tmp_path / "cache"
    a = storage.local_dir(storage.join(root, "run_1/model"), cache_root=cache)
    assert (a / "weights.bin").read_bytes() == b"first"
    b = storage.local_dir(storage.join(root, "run/1/model"), cache_root=cache)
    assert (b / "weights.bin").read_bytes() == b"second"


def test_run_stage_on_s3_skips_when_done(s3_bucket):
    root, _ = s3_bucket
    out = storage.join(root, "stage-out")
    body = Body(out)
    assert not run_stage("prepare", Config(), {}, out, ("world",), body).skipped
    assert run_stage("prepare", Config(), {}, out, ("world",), body).skipped
    assert body.calls == 1
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 1}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prepare_output_keeps_the_named_entries(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")[0]
    out = storage.join(root, "train-out")
    storage.write_bytes(storage.join(out, "model.safetensors"), b"half")
    storage.write_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt"), b"resume me")
    storage.prepare_output(out, keep=("_checkpoints",))
    assert not storage.exists(storage.join(out, "model.safetensors"))
    assert storage.read_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt")) == b"resume me"
    storage.prepare_output(out)
    assert not storage.exists(storage.join(out, "_checkpoints"))
