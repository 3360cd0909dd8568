"""The sample stage on a real world and the warm-started tiny policy: shards, bad input, budgets."""

from __future__ import annotations

import json
import math

import pytest

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import Config, WorldConfig
from arborl.components.envs.retriever import FTSRetriever, RetrieverError
from arborl.components.envs.world import QUESTION_TEMPLATE
from arborl.components.sampling.forest import read_prompt_tokens
from arborl.components.stages import prepare, sample
from arborl.components.training.models import save_policy


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, policy, tokenizer, world_cfg):
    """prepare's output for the fixtures' world (same world config and seed) and the policy as a model dir."""
    root = tmp_path_factory.mktemp("sample_stage")
    cfg = _cfg()
    world = prepare.run(cfg, {}, str(root / "prepare")).out
    model = str(root / "model")
    save_policy(policy, tokenizer, model)
    manifests.write_manifest(model, stage="warmstart", inputs={}, config_hash="test", outputs={"model": model},
                           metrics={}, started=0.0)
    return root, world, model


def _cfg(**sampling) -> Config:
    """The fixtures' world (see tests/components/conftest.py); the model comes from the saved policy."""
    return Config(
        world=WorldConfig(num_people=60, num_train=50, num_val=10, num_test=20),
        agent={"max_turns": 4, "max_tokens_per_turn": 12, "max_total_tokens": 200,
               "prompt_template": QUESTION_TEMPLATE},  # the word-level prompt the policy was warm-started on
        sampling={"prompts_per_iteration": 8, **sampling},
    )


def _plain(rows):
    return sorted(
        tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(r.items()) if k != "logprobs")
        for r in rows
    )


def _logprobs(rows):
    return {(r["prompt_id"], r["tree_id"], r["node_id"]): [x for x in r["logprobs"] if not math.isnan(x)]
            for r in rows}


def test_two_shards_give_the_same_trees_as_one(dirs):
    root, world, model = dirs
    cfg = _cfg()
    inputs = {"model": model, "world": world}
    whole = sample.run(cfg, inputs, str(root / "one"), iteration=1)
    out2 = str(root / "two")
    parts = [sample.run(cfg, inputs, sample.shard_out(out2, i, 2), iteration=1, shard=(i, 2)) for i in range(2)]
    assert [p.outputs["nodes"].rsplit("/", 1)[1] for p in parts] == [
        "nodes-part-00000-of-00002.parquet", "nodes-part-00001-of-00002.parquet"]
    part_prompts = [{r["prompt_id"] for r in schemas.read(p.outputs["nodes"], schemas.NODES).to_pylist()}
                    for p in parts]
    assert part_prompts[0] and part_prompts[1] and not part_prompts[0] & part_prompts[1]
    merged = sample.merge(cfg, [p.out for p in parts], out2, iteration=1)
    whole_tokens = read_prompt_tokens(whole.out)  # the prompts as sampled, for train: merged like the nodes
    assert whole_tokens and read_prompt_tokens(merged.out) == whole_tokens

    a = schemas.read(whole.outputs["nodes"], schemas.NODES).to_pylist()
    b = schemas.read(merged.outputs["nodes"], schemas.NODES).to_pylist()
    assert len(a) == len(b) > 0
    assert [(r["prompt_id"], r["tree_id"], r["node_id"]) for r in a] == [
        (r["prompt_id"], r["tree_id"], r["node_id"]) for r in b]  # same order, too
    assert _plain(a) == _plain(b)
    la, lb = _logprobs(a), _logprobs(b)
    for key in la:  # batch shape changes float rounding only
        assert la[key] == pytest.approx(lb[key], abs=1e-4)
    for key in ("trajectories", "generated_tokens", "prefilled_tokens", "tool_calls", "trees", "nodes"):
        assert merged.metrics[key] == whole.metrics[key]
    ce = "chain_equivalents_per_prompt"
    assert merged.metrics[ce] == pytest.approx(whole.metrics[ce])
    assert merged.metrics["shards"] == 2
    stats_a = storage.read_json(whole.outputs["prompt_stats"])
    stats_b = storage.read_json(merged.outputs["prompt_stats"])
    assert stats_a.keys() == stats_b.keys() and len(stats_a) == 8
    for pid in stats_a:
        assert stats_a[pid]["rounds"] == stats_b[pid]["rounds"]
        assert stats_a[pid]["chain_equivalents"] == pytest.approx(stats_b[pid]["chain_equivalents"])
    # a finished shard or merge is skipped on re-run
    assert sample.merge(cfg, [p.out for p in parts], out2, iteration=1).skipped
    with pytest.raises(ValueError, match="shard 2/2"):
        sample.run(cfg, inputs, str(root / "bad"), iteration=1, shard=(2, 2))
    assert sample.parse_shard("1/3") == (1, 3)
    with pytest.raises(ValueError, match="i/n"):
        sample.parse_shard("one of two")


class FailingRetriever(FTSRetriever):
    """The real index, except that any query naming `subject` raises, as a broken search service would."""

    subject = ""

    def search(self, query, k=None):
        if self.subject in query:
            raise RetrieverError(f"search service failed for {query!r}")
        return super().search(query, k)


def _world_with_bad_prompts(root, world, bad_ids: dict[str, str]) -> str:
    """A copy of the world whose named train prompts (text and chat message) are replaced by the given texts."""
    out = str(root / f"world-bad-{len(bad_ids)}")
    prompts = schemas.read(storage.join(world, "prompts.parquet"), schemas.PROMPTS).to_pylist()
    for p in prompts:
        if p["prompt_id"] in bad_ids:
            p["prompt"] = bad_ids[p["prompt_id"]]
            p["messages"] = json.dumps([{"role": "user", "content": p["prompt"]}])
    schemas.write(prompts, schemas.PROMPTS, storage.join(out, "prompts.parquet"))
    storage.write_bytes(storage.join(out, "facts.parquet"), storage.read_bytes(storage.join(world, "facts.parquet")))
    manifests.write_manifest(out, stage="prepare", inputs={}, config_hash="test", outputs={}, metrics={}, started=0.0)
    return out


def test_bad_prompts_are_recorded_left_out_and_fail_the_stage_past_the_limit(dirs, monkeypatch):
    root, world, model = dirs
    cfg = _cfg(prompts_per_iteration=20, max_bad_fraction=0.3)
    drawn = sample.iteration_prompts(cfg, world, 1)
    empty_id, long_id = drawn[0]["prompt_id"], drawn[1]["prompt_id"]
    bad_world = _world_with_bad_prompts(root, world, {empty_id: "   ", long_id: " ".join(["city"] * 250)})
    # a search naming the subject of a third prompt fails
    victim = drawn[2]
    import json

    FailingRetriever.subject = json.loads(victim["extra_info"])["subject"]
    facts = schemas.read(storage.join(world, "facts.parquet"), schemas.FACTS)
    monkeypatch.setattr(sample, "load_retriever", lambda uri, cfg: FailingRetriever.from_facts(facts, top_k=3))

    res = sample.run(cfg, {"model": model, "world": bad_world}, str(root / "bad-ok"), iteration=1)
    stats = storage.read_json(res.outputs["prompt_stats"])
    assert stats[empty_id]["bad"] == "empty prompt"
    assert stats[long_id]["bad"].startswith("prompt is 251 tokens; the context holds 200")
    tool_bad = {pid for pid, s in stats.items() if s.get("bad", "").startswith("tool error: search service failed")}
    assert victim["prompt_id"] in tool_bad
    bad = {pid for pid, s in stats.items() if s.get("bad")}
    assert bad == {empty_id, long_id} | tool_bad
    assert [b["prompt_id"] for b in res.metrics["bad_prompts"]] == sorted(bad, key=lambda p: stats[p]["position"])
    assert res.metrics["bad_prompt_count"] == len(bad)
    assert res.metrics["bad_prompt_fraction"] == pytest.approx(len(bad) / 20)
    nodes = schemas.read(res.outputs["nodes"], schemas.NODES).to_pylist()
    assert {n["prompt_id"] for n in nodes} == {p["prompt_id"] for p in drawn} - bad  # left out of training
    assert manifests.read_manifest(res.out)["metrics"]["bad_prompts"] == res.metrics["bad_prompts"]

    strict = _cfg(prompts_per_iteration=20, max_bad_fraction=0.05)
    with pytest.raises(ValueError, match="sampling.max_bad_fraction=0.05") as err:
        sample.run(strict, {"model": model, "world": bad_world}, str(root / "bad-fail"), iteration=1)
    message = str(err.value)
    assert f"prompt_id {empty_id!r}: empty prompt" in message and long_id in message and victim["prompt_id"] in message
    assert manifests.read_manifest(str(root / "bad-fail")) is None  # a failed stage leaves no manifest


def test_chains_budget_sets_m_n_l_and_logs_them(dirs):
    root, world, model = dirs
    cfg = Config.model_validate({**_cfg(prompts_per_iteration=3).model_dump(), "budget": {"chains_per_prompt": 8}})
    res = sample.run(cfg, {"model": model, "world": world}, str(root / "budget8"), iteration=1)
    assert (res.metrics["plan_trees_per_prompt"], res.metrics["plan_expansions_per_round"],
            res.metrics["plan_expansion_rounds"]) == (4, 2, 1)
    assert res.metrics["trajectories"] == 3 * 4 * (1 + 2)
