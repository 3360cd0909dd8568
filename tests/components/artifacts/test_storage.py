"""artifacts.storage and manifests: atomic writes, JSON/Parquet helpers, stage manifests via run_stage, S3."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from arborl.components.artifacts import local_cache, manifests, schemas, stage_keys, storage
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
    assert local_cache.local_dir(str(tmp_path / "dst")) == tmp_path / "dst"


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


def _input(tmp_path, name: str = "world", cfg: Config | None = None) -> str:
    uri = str(tmp_path / name)
    run_stage("prepare", cfg or Config(), {}, uri, ("world",), Body(uri))
    return uri


def test_run_stage_runs_once_then_skips(tmp_path):
    cfg = Config()
    inputs = {"world": _input(tmp_path)}
    out = str(tmp_path / "out")
    body = Body(out)

    first = run_stage("train", cfg, inputs, out, ("train",), body, iteration=1)
    assert body.calls == 1 and not first.skipped
    manifest = manifests.read_manifest(out)
    assert manifest["stage"] == "train"
    assert manifest["inputs"] == inputs
    assert manifest["config_hash"] == cfg.section_hash("train", iteration=1)
    assert manifest["outputs"] == {"data": storage.join(out, "data.json")}
    assert manifest["metrics"] == {"calls": 1}
    assert manifest["code_version"] == manifests.CODE_VERSION

    second = run_stage("train", Config(), dict(inputs), out, ("train",), body, iteration=1)
    assert body.calls == 1 and second.skipped
    assert second.outputs == first.outputs and second.metrics == first.metrics
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 1}


def test_run_stage_reruns_when_config_section_params_or_inputs_change(tmp_path):
    world = _input(tmp_path, "world")
    other_world = _input(tmp_path, "world2", config_from_dict({"world": {"num_people": 50}}))  # another world
    same_world = _input(tmp_path, "world3")  # the same world at another place
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
    # inputs changed: an input is what it holds, not where it is
    assert run_stage("train", changed, {"world": same_world}, out, ("train",), body, iteration=2).skipped
    run_stage("train", changed, {"world": other_world}, out, ("train",), body, iteration=2)
    assert body.calls == 4
    # another stage's output at the same place is not this stage's to replace
    with pytest.raises(manifests.OutputNotOwned, match="stage 'train'"):
        run_stage("label", changed, {"world": other_world}, out, ("train",), body, iteration=2)
    assert body.calls == 4
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 4}


def test_half_written_output_is_wiped_and_rerun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / manifests.MARKER).write_text(json.dumps({"stage": "prepare"}))  # the stage had started here
    (out / "stale.parquet").write_bytes(b"half")
    (out / "sub").mkdir()
    (out / "sub" / "junk").write_text("x")
    body = Body(str(out))
    result = run_stage("prepare", Config(), {}, str(out), ("world",), body)
    assert body.calls == 1 and not result.skipped
    assert sorted(p.name for p in out.iterdir()) == [manifests.MANIFEST, manifests.MARKER, "data.json"]
    assert storage.read_json(str(out / manifests.MARKER)) == {"stage": "prepare"}


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
    assert manifests.read_manifest(out) is None
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


# --- S3 through a local moto server ------------------------------------------------------------------


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
    assert manifests.read_manifest(storage.join(base, "stage")) is None
    stage = storage.join(base, "stage")
    storage.write_json(storage.join(stage, "out.json"), {"v": 1})
    manifests.write_manifest(stage, stage="s", inputs={}, config_hash="h", outputs={"o": "x"}, metrics={"m": 1.5},
                           started=0.0, key=stage_keys.stage_key("s", "h", {}), files=stage_keys.file_digests(stage))
    manifest = manifests.read_manifest(stage)
    assert manifest["stage"] == "s" and manifest["metrics"] == {"m": 1.5}
    assert set(manifest["files"]) == {"out.json"} and manifest["files"]["out.json"]["size"] > 0
    assert stage_keys.completed(stage, stage="s", inputs={}, config_hash="h")
    storage.write_json(storage.join(stage, "out.json"), {"v": 2})  # changed behind the manifest's back
    assert stage_keys.completed(stage, stage="s", inputs={}, config_hash="h") is None

    # directories: upload, then fetch a local copy
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    storage.upload_dir(src, storage.join(base, "model"))
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="arborl-test", Prefix="run/model/")["Contents"])
    assert keys == ["run/model/config.json", "run/model/sub/weights.bin"]
    local = local_cache.local_dir(storage.join(base, "model"), cache_root=tmp_path / "cache")
    assert (local / "config.json").read_text() == '{"a": 1}'
    assert (local / "sub" / "weights.bin").read_bytes() == bytes(range(256))
    assert local_cache.local_dir(storage.join(base, "model"), cache_root=tmp_path / "cache") == local  # cached

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
    assert (local_cache.local_dir(uri, cache_root=cache) / "weights.bin").read_bytes() == b"version 1"
    storage.write_json(storage.join(uri, manifests.MARKER), {"stage": "train"})
    # the stage that made it runs again (e.g. after a config change): its output is wiped and rewritten
    manifests.prepare_output(uri, stage="train")
    (src / "weights.bin").write_bytes(b"version 2")
    storage.upload_dir(src, uri)
    assert storage.read_bytes(storage.join(uri, "weights.bin")) == b"version 2"
    assert (local_cache.local_dir(uri, cache_root=cache) / "weights.bin").read_bytes() == b"version 2"


def test_local_dir_keeps_different_uris_apart(s3_bucket, tmp_path):
    root, _ = s3_bucket
    for name, content in (("run_1/model", b"first"), ("run/1/model", b"second")):
        src = tmp_path / name.replace("/", "-")
        src.mkdir()
        (src / "weights.bin").write_bytes(content)
        storage.upload_dir(src, storage.join(root, name))
    cache = tmp_path / "cache"
    a = local_cache.local_dir(storage.join(root, "run_1/model"), cache_root=cache)
    assert (a / "weights.bin").read_bytes() == b"first"
    b = local_cache.local_dir(storage.join(root, "run/1/model"), cache_root=cache)
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
    manifests.prepare_output(out, stage="train")
    storage.write_bytes(storage.join(out, "model.safetensors"), b"half")
    storage.write_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt"), b"resume me")
    manifests.prepare_output(out, stage="train", keep=("_checkpoints",))
    assert not storage.exists(storage.join(out, "model.safetensors"))
    assert storage.read_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt")) == b"resume me"
    assert storage.read_json(storage.join(out, manifests.MARKER)) == {"stage": "train"}
    manifests.prepare_output(out, stage="train")
    assert not storage.exists(storage.join(out, "_checkpoints"))
    assert storage.exists(storage.join(out, manifests.MARKER))


# --- where outputs may go ------------------------------------------------------------------------------


def test_contains_normalises_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = str(tmp_path / "a")
    assert storage.contains(a, a + "/")
    assert storage.contains(a + "/", str(tmp_path / "a" / "b" / ".." / "c"))
    assert storage.contains("a", a + "/x")  # relative against absolute
    assert storage.contains(f"file://{a}", "a/x/y")
    assert storage.contains(str(tmp_path / "z" / ".." / "a"), a)
    assert not storage.contains(a, str(tmp_path / "ab"))  # component boundary, not string prefix
    assert not storage.contains(a, str(tmp_path / "a" / ".." / "b"))
    assert not storage.contains(a + "/x", a)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert storage.contains(str(tmp_path / "real"), str(tmp_path / "link" / "f"))


def test_contains_on_object_store_uris():
    assert storage.contains("s3://b/run", "s3://b/run/x")
    assert storage.contains("s3://b/run/", "s3://b/run")
    assert storage.contains("s3://b/run", "s3://b/other/../run/y")
    assert not storage.contains("s3://b/run", "s3://b/run2")
    assert not storage.contains("s3://b/run", "s3://c/run/x")
    assert not storage.contains("s3://b/run", "/b/run/x")  # another filesystem


def test_child_refuses_a_path_leaving_its_root(tmp_path):
    root = str(tmp_path / "a" / "b")
    assert storage.child(root, "run", "iter_001", "sample") == f"{root}/run/iter_001/sample"
    assert storage.child("s3://bucket/runs/", "x") == "s3://bucket/runs/x"
    # what run.output_root=<tmp>/a/b run.name=../../escaped derived before: <tmp>/escaped
    assert os.path.normpath(storage.join(root, "../../escaped")) == str(tmp_path / "escaped")
    for parts in (("../../escaped",), ("..",), (".",), ("",), ("x", "../../y"), ("x/../..",)):
        with pytest.raises(storage.OutsideRoot) as err:
            storage.child(root, *parts)
        assert root in str(err.value) and storage.join(root, *parts) in str(err.value)
    with pytest.raises(storage.OutsideRoot, match="s3://bucket/runs"):
        storage.child("s3://bucket/runs", "../other")
    with pytest.raises(storage.OutsideRoot):
        storage.ensure_inside("s3://bucket/run", "s3://bucket/run2/x")
    assert storage.ensure_inside("s3://bucket/run", "s3://bucket/run/x") == "s3://bucket/run/x"


def test_refusals_pickle_across_processes():
    import pickle

    err = pickle.loads(pickle.dumps(manifests.OutputNotOwned("verify", "/x/out", "it is an existing file")))
    assert isinstance(err, ValueError) and err.uri == "/x/out" and "/x/out" in str(err)
    err = pickle.loads(pickle.dumps(storage.OutsideRoot("/r", "/escaped")))
    assert err.root == "/r" and "/escaped" in str(err)


def test_prepare_output_writes_the_marker_before_the_stage_writes(tmp_path):
    out = str(tmp_path / "new" / "out")
    manifests.prepare_output(out, stage="verify")
    assert os.listdir(out) == [manifests.MARKER]
    assert storage.read_json(storage.join(out, manifests.MARKER)) == {"stage": "verify"}
    manifests.check_output(out, stage="verify")
    with pytest.raises(manifests.OutputNotOwned, match="stage 'verify'.*its _stage.json"):
        manifests.check_output(out, stage="label")
    empty = tmp_path / "empty"
    empty.mkdir()
    manifests.prepare_output(str(empty), stage="label")  # an empty directory is fine
    assert os.listdir(empty) == [manifests.MARKER]


def test_check_output_refusals_delete_nothing(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(manifests.OutputNotOwned, match="existing file"):
        manifests.prepare_output(str(file), stage="verify")
    assert file.read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(manifests.OutputNotOwned, match="no stage's output.*notes.txt"):
        manifests.prepare_output(str(mine), stage="verify")
    assert os.listdir(mine) == ["notes.txt"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / manifests.MARKER).write_text("not json")
    with pytest.raises(manifests.OutputNotOwned, match="names no stage"):
        manifests.prepare_output(str(broken), stage="verify")
    assert (broken / manifests.MARKER).read_text() == "not json"


def test_s3_check_output_on_objects_and_prefixes(s3_bucket):
    root, client = s3_bucket
    base = f"{root}/ownership"  # the moto backend outlives one test: keep to a prefix of our own
    client.put_object(Bucket="arborl-test", Key="ownership/run/notes.txt", Body=b"mine")
    client.put_object(Bucket="arborl-test", Key="ownership/dir/notes.txt", Body=b"mine")
    with pytest.raises(manifests.OutputNotOwned, match=f"{base}/run/notes.txt: it is an existing file"):
        manifests.prepare_output(f"{base}/run/notes.txt", stage="verify")
    with pytest.raises(manifests.OutputNotOwned, match=f"{base}/dir/: it is a non-empty directory"):
        manifests.prepare_output(f"{base}/dir/", stage="verify")
    manifests.prepare_output(f"{base}/run2", stage="verify")  # `run` is no prefix of `run2`
    manifests.prepare_output(f"{base}/ru", stage="verify")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="arborl-test", Prefix="ownership/")["Contents"])
    assert keys == ["ownership/dir/notes.txt", f"ownership/ru/{manifests.MARKER}", "ownership/run/notes.txt",
                    f"ownership/run2/{manifests.MARKER}"]


# --- unreadable artifacts: the error names the URI and what is wrong ----------------------------------


def _truncated_parquet(uri: str) -> None:
    storage.write_parquet(pa.table({"x": pa.array(range(200), pa.int64()), "s": ["row"] * 200}), uri)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 2])


def test_truncated_parquet_names_the_file_and_the_reason(tmp_path):
    uri = str(tmp_path / "nodes.parquet")
    _truncated_parquet(uri)
    with pytest.raises(storage.ArtifactError) as err:
        storage.read_parquet(uri)
    message = str(err.value)
    assert message.startswith(f"{uri}: not a Parquet file or truncated (")
    assert "magic bytes" in message and "<Buffer>" not in message
    storage.write_bytes(uri, b"PAR1")
    with pytest.raises(storage.ArtifactError, match="nodes.parquet: not a Parquet file or truncated"):
        storage.read_parquet(uri)


def test_non_json_file_and_manifest_name_the_file(tmp_path):
    uri = str(tmp_path / "stats.json")
    storage.write_json(uri, {"a": [1, 2, 3]})
    storage.write_bytes(uri, storage.read_bytes(uri)[:-4])  # truncated
    with pytest.raises(storage.ArtifactError) as err:
        storage.read_json(uri)
    assert str(err.value).startswith(f"{uri}: not a JSON file or truncated (")
    out = tmp_path / "stage"
    out.mkdir()
    (out / manifests.MANIFEST).write_bytes(b"\x80\x04not json")
    with pytest.raises(storage.ArtifactError) as err:
        stage_keys.completed(str(out), stage="s", inputs={}, config_hash="h")
    assert str(out / manifests.MANIFEST) in str(err.value) and "not a JSON file" in str(err.value)
    assert isinstance(err.value, ValueError)  # callers that catch ValueError still do


def test_s3_truncated_parquet_names_the_s3_uri(s3_bucket):
    root, _ = s3_bucket
    uri = f"{root}/artifact-errors/nodes.parquet"
    _truncated_parquet(uri)
    with pytest.raises(storage.ArtifactError, match=f"^{uri}: not a Parquet file or truncated"):
        storage.read_parquet(uri)
