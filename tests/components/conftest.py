"""Shared fixtures for the component tests: a small seeded world, its tokenizer and tiny models.

The suite runs torch single-threaded: the models are tiny, and on a shared 2-core machine torch's
default of one thread per core is two orders of magnitude slower under contention.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)

from arborl.components.config import ModelConfig, SearchConfig, WarmstartConfig, WorldConfig  # noqa: E402
from arborl.components.envs.demos import demonstration  # noqa: E402
from arborl.components.envs.retriever import FTSRetriever  # noqa: E402
from arborl.components.envs.world import RELATIONS, build_world, make_questions, vocabulary  # noqa: E402
from arborl.components.training.models import build_model, build_tokenizer  # noqa: E402
from arborl.components.training.warmstart import supervised_train, tokenize_demo  # noqa: E402

SEED = 0
TINY_MODEL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def world_cfg() -> WorldConfig:
    return WorldConfig(num_people=60, num_train=50, num_val=10, num_test=20)


@pytest.fixture(scope="session")
def world(world_cfg):
    return build_world(world_cfg, SEED)


@pytest.fixture(scope="session")
def questions(world, world_cfg) -> dict[str, list[dict]]:
    return {
        split: make_questions(world, world_cfg, SEED, split, n)
        for split, n in (("train", world_cfg.num_train), ("val", world_cfg.num_val), ("test", world_cfg.num_test))
    }


@pytest.fixture(scope="session")
def facts(world) -> list[dict]:
    return world.fact_rows()


@pytest.fixture(scope="session")
def retriever(facts) -> FTSRetriever:
    return FTSRetriever([f["text"] for f in facts], top_k=SearchConfig().topk)


@pytest.fixture(scope="session")
def fact_index(facts) -> dict[str, tuple[str, str, str]]:
    return {f["text"]: (f["subject"], f["relation"], f["object"]) for f in facts}


@pytest.fixture(scope="session")
def entities_by_type(world) -> dict[str, list[str]]:
    return {kind: world.entities(kind) for kind in {t for _, _, t in RELATIONS.values()}}


@pytest.fixture(scope="session")
def tokenizer(world):
    return build_tokenizer(vocabulary(world))


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh random tiny Llama (function scope: tests may change it)."""
    return build_model(TINY_MODEL, tokenizer, SEED)


@pytest.fixture(scope="session")
def policy(tokenizer, questions, retriever, fact_index, entities_by_type):
    """A tiny Llama briefly warm-started on demonstrations, so that it writes multi-turn search episodes.

    Session scoped: tests must not modify it (deep-copy it first).
    """
    rng = random.Random(SEED)
    episodes = [
        demonstration(rng.choice(questions["train"]), retriever, fact_index, entities_by_type, rng, 0.3, 0.1)
        for _ in range(300)
    ]
    demos = [tokenize_demo(tokenizer, ep) for ep in episodes]
    model = build_model(TINY_MODEL, tokenizer, SEED)
    supervised_train(model, demos, WarmstartConfig(steps=120, batch_size=16, lr=1e-2), tokenizer.pad_token_id, SEED)
    model.eval()
    return model


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """A bucket on a moto S3 server on 127.0.0.1 (a fresh server per test); yields (root URI, boto3 client)."""
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
