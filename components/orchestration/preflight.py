"""Preflight: what a run needs from outside its config, checked in seconds before anything starts — rather than a
failure minutes in, or a run that ends well on a broken setup.

* `model.path` (a local directory) exists and holds a tokenizer, and its chat template renders a generation
  prompt: with and without `add_generation_prompt` the rendered prompt must differ (a template that ignores it
  leaves the assistant turn unopened, and a policy then learns from a prompt it never sees at inference);
* `search.url` (backend http) answers a probe query;
* every Parquet file of `data.*` exists and has the required columns.

Reward callables are imported when the config is validated. Each problem is one line naming the key and value.
"""

from __future__ import annotations

from pathlib import Path

from arborl.components.config import Config

PROBE_TIMEOUT_S = 5.0


def _local_dir(path: str) -> Path | None:
    """The local directory a `model.path` names, or None for a Hub id or a remote URI (not checked here)."""
    if "://" in path:
        return None
    candidate = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or candidate.exists() or path.count("/") != 1
    return candidate if looks_local else None


def check_model(cfg: Config) -> list[str]:
    path = cfg.model.path
    if not path:
        return []
    local = _local_dir(path)
    if local is None:
        return []
    if not local.is_dir():
        return [f"model.path={path!r}: no such directory"]
    if not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                "tokenizer.model")):
        return [f"model.path={path!r}: holds no tokenizer (tokenizer.json or tokenizer_config.json)"]
    if cfg.model.chat_template == "none":
        return []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(local))
    except Exception as exc:  # noqa: BLE001 - any load failure is this key's problem
        return [f"model.path={path!r}: its tokenizer does not load ({type(exc).__name__}: {exc})"]
    if not getattr(tokenizer, "chat_template", None):
        return []  # no template: prompts are plain text (model.chat_template auto)
    messages = [{"role": "user", "content": "preflight"}]
    try:
        with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # noqa: BLE001
        return [f"model.path={path!r}: its chat template does not render ({type(exc).__name__}: {exc})"]
    if with_prompt == without:
        return [f"model.path={path!r}: its chat template ignores add_generation_prompt (the assistant turn is never "
                "opened); fix the template, or set model.chat_template=none for plain-text prompts"]
    return []


def check_search(cfg: Config) -> list[str]:
    if cfg.search.backend != "http" or not cfg.search.url:
        return []
    from arborl.components.envs.http_retriever import HTTPRetriever
    from arborl.components.envs.retriever import RetrieverError

    probe = HTTPRetriever(cfg.search.url, topk=1, timeout_s=min(cfg.search.timeout_s, PROBE_TIMEOUT_S), retries=0)
    try:
        with probe:
            probe.search("preflight")
    except RetrieverError as exc:
        return [f"search.url={cfg.search.url!r}: the retriever does not answer a probe query ({exc})"]
    return []


def check_data(cfg: Config) -> list[str]:
    if cfg.data.source != "parquet":
        return []
    import pyarrow.parquet as pq

    from arborl.components.artifacts import storage
    from arborl.components.data.snapshots import SnapshotError, data_files, resolve_snapshot
    from arborl.components.data.verl_parquet import REQUIRED_COLUMNS

    try:  # a snapshot folder (data.snapshot_root) or the files as given
        files = data_files(resolve_snapshot(cfg).data)
    except SnapshotError as exc:
        return [f"data.snapshot: {exc}"]
    problems = []
    for split, uris in files.items():
        key = f"{split}_files"
        for uri in uris:
            if not storage.exists(uri):
                problems.append(f"data.{key}: {uri!r}: no such file")
                continue
            try:
                fs, path = storage.filesystem(uri)
                with fs.open(path, "rb") as fh:
                    names = pq.ParquetFile(fh).schema_arrow.names
            except Exception as exc:  # noqa: BLE001
                problems.append(f"data.{key}: {uri!r}: not a Parquet file ({type(exc).__name__}: {exc})")
                continue
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                problems.append(f"data.{key}: {uri!r}: missing required column(s) {', '.join(missing)}")
    return problems


def preflight(cfg: Config) -> list[str]:
    """Every problem found, one line each naming the key and its value; empty when the run can start."""
    return [*check_model(cfg), *check_search(cfg), *check_data(cfg)]
