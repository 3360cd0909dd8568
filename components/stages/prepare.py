"""prepare: the run's prompts — the synthetic world's fact corpus and train/val/test questions split by subject,
or (`data.source: parquet`) verl / Search-R1 Parquet files read unchanged."""

from __future__ import annotations

from functools import partial
from typing import Any

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.data import snapshots, verl_parquet
from arborl.components.envs.world import build_world, make_questions
from arborl.components.stages.base import run_stage
from arborl.components.stages.contract import StageResult

SECTIONS = ("world", "data")
SPLITS = ("train", "val", "test")
MAX_LISTED_BAD_ROWS = 1000  # bad rows listed in the manifest; `bad_rows_total` counts them all


def hash_params(cfg: Config) -> dict[str, Any]:
    """Settings outside SECTIONS that the prompts depend on (the user message built around a question)."""
    return {"prompt_template": cfg.agent.prompt_template}


def config_hash(cfg: Config) -> str:
    """The config hash a finished prepare output of `cfg` carries in its manifest."""
    return cfg.section_hash(*SECTIONS, **hash_params(cfg))


def _outputs(out: str) -> dict[str, str]:
    return {"facts": storage.join(out, schemas.FACTS_FILE), "prompts": storage.join(out, schemas.PROMPTS_FILE),
            "world": storage.join(out, schemas.WORLD_FILE)}


def prepare_world(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Build the world from `cfg.world` and the run's seed; write its facts, questions and entities under `out`."""
    world = build_world(cfg.world, cfg.run.seed)
    facts = world.fact_rows()
    prompts = []
    for split, n in (("train", cfg.world.num_train), ("val", cfg.world.num_val), ("test", cfg.world.num_test)):
        prompts += make_questions(world, cfg.world, cfg.run.seed, split, n, cfg.agent.prompt_template)
    outputs = _outputs(out)
    schemas.write(facts, schemas.FACTS, outputs["facts"])
    schemas.write(prompts, schemas.PROMPTS, outputs["prompts"])
    storage.write_json(outputs["world"], world.to_json())
    counts = {s: sum(p["split"] == s for p in prompts) for s in SPLITS}
    return outputs, {"facts": len(facts), "people": len(world.people),
                     **{f"{k}_prompts": v for k, v in counts.items()}}


def prepare_parquet(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Read `cfg.data`'s train/val/test files into the prompts artifact, with an empty fact corpus.

    Fails, before writing anything, on a missing file or column, or when more than `data.max_bad_fraction` of
    the rows are unusable; otherwise the manifest lists the bad rows (the first MAX_LISTED_BAD_ROWS)."""
    files = snapshots.data_files(cfg.data)
    result = verl_parquet.read_files(files, cfg.data.batch_rows)
    verl_parquet.check_bad_rows(result, cfg.data.max_bad_fraction)
    counts = result.counts()
    for split in ("train", "test"):
        if not counts.get(split):
            bad = [b for b in result.bad if b["file"] in files[split]]
            raise ValueError(f"data.{split}_files ({', '.join(files[split])}) hold no usable rows"
                             + (f": {verl_parquet.describe_bad(bad)}" if bad else ""))
    outputs = _outputs(out)
    schemas.write([], schemas.FACTS, outputs["facts"])
    schemas.write(result.rows, schemas.PROMPTS, outputs["prompts"])
    storage.write_json(outputs["world"], {"source": "parquet", "files": files})
    return outputs, {"rows": result.total, **{f"{s}_prompts": counts.get(s, 0) for s in SPLITS},
                     "bad_rows_total": len(result.bad), "bad_rows": result.bad[:MAX_LISTED_BAD_ROWS]}


def prepare_prompts(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The prompts of `cfg.data.source`: the synthetic world's questions or the Parquet files' rows."""
    work = prepare_parquet if cfg.data.source == "parquet" else prepare_world
    return work(cfg, inputs, out)


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("prepare", cfg, inputs, out, SECTIONS, partial(prepare_prompts, cfg, inputs, out),
                     **hash_params(cfg))
