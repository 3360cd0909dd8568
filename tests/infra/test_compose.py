"""infra/compose.yaml, offline: there is no Docker engine here, so nothing is started. The file is checked
against the Compose Specification's JSON schema (tests/infra/compose-spec.json, from compose-spec/compose-spec,
Apache-2.0) and for what the docs promise: the services and their ports, a health check on every long-running
service, named volumes, no literal secret, every `${VAR}` listed in infra/.env.example, and well-formed
database URLs once the example values are filled in."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"

LONG_RUNNING = {"postgres", "prefect-server", "prefect-worker", "minio", "mlflow"}
ONE_SHOT = {"minio-init", "runs-init"}
PORTS = {"prefect-server": {"4200:4200"}, "mlflow": {"5000:5000"}, "minio": {"9000:9000", "9001:9001"}}
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}; `$$` is a literal `$` for the container's shell
VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    values = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            assert "=" in line, f"{ENV_EXAMPLE}:{n}: not KEY=value: {line!r}"
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of `text` with `env` (the subset infra/compose.yaml uses)."""
    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        if op and op.startswith(":") and not env.get(name):
            return default
        if op == "-" and name not in env:
            return default
        assert name in env, f"{COMPOSE}: ${{{name}}} has no value"
        return env[name]

    return VAR.sub(sub, text).replace("$$", "$")


def _strings(node, path: str = ""):
    """Every string of a YAML tree with its path (mapping keys joined by '.', list items by [i])."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def test_matches_the_compose_specification(compose):
    """The Compose Specification schema (what `docker compose config` checks first) accepts the file."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_services_and_ports(compose):
    """The services and host ports the docs promise: Prefect 4200, MLflow 5000, MinIO 9000/9001."""
    services = compose["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name, ports in PORTS.items():
        assert set(services[name]["ports"]) == ports, name
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3-python3.11")
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    assert "0.0.0.0" in services["prefect-server"]["command"]
    worker = services["prefect-worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile" and (COMPOSE.parent / worker["build"]["context"]
                                                               / "Dockerfile").is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\n" in dockerfile  # the base a registry serves; local builds pass theirs
    assert f"FROM ${{BASE_IMAGE}} AS {worker['build']['target']}" in dockerfile
    command = [*worker["entrypoint"], *worker["command"]]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "arborl-process"
    assert worker["environment"]["ARBORL_HOME"] == "/app"  # prefect.yaml's pull step changes into it


def test_every_long_running_service_has_a_healthcheck(compose):
    """Long-running services restart and report health; dependants wait for `service_healthy`, and one-shot
    jobs are awaited with `service_completed_successfully`."""
    services = compose["services"]
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"] and not check.get("disable"), f"{name} has no healthcheck"
        assert services[name]["restart"] == "unless-stopped", name
    for name in ONE_SHOT:
        assert "healthcheck" not in services[name] and services[name]["restart"] == "no", name
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_healthy" if dependency in LONG_RUNNING else "service_completed_successfully"
            assert condition["condition"] == expected, f"{name} -> {dependency}"
    assert services["prefect-worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"


def test_volumes_are_named(compose):
    """State lives in named volumes declared at the top level; the only bind mount is the init script."""
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).is_file(), f"{name}: {source} missing"
                assert mount.endswith(":ro"), f"{name}: bind mount {mount} is not read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared == {"postgres-data", "minio-data", "arborl-runs"}


def test_docker_pool_variant_joins_the_stack(compose):
    """prefect.yaml's docker pool containers join the compose network and mount the same runs volume, under
    the fixed names the compose file gives them, and reach the services by their compose names."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    variables = spec["definitions"]["work_pools"]["docker"]["job_variables"]
    assert variables["networks"] == [compose["networks"]["default"]["name"]]
    volume, target = variables["volumes"][0].split(":")[:2]
    assert volume == compose["volumes"]["arborl-runs"]["name"]
    assert f"arborl-runs:{target}" in compose["services"]["prefect-worker"]["volumes"]
    for url in (variables["env"]["MLFLOW_TRACKING_URI"], variables["env"]["AWS_ENDPOINT_URL"]):
        assert urlsplit(url).hostname in compose["services"], url


def test_no_literal_secrets(compose):
    """Every password or key, alone or inside a URL, comes from a `${VAR}`; none is written in the file."""
    checked = 0
    for path, value in _strings(compose):
        key = path.rsplit(".", 1)[-1]
        if SECRET_KEY.search(key):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", value), f"{path}: literal secret {value!r}"
            checked += 1
        for url in re.findall(r"[a-z0-9+]+://[^\s\"']+", value):
            password = urlsplit(url.split("=", 1)[-1]).password
            if password is not None:
                assert VAR.fullmatch(password), f"{path}: literal password in {url}"
                checked += 1
    assert checked >= 8  # postgres, minio, mlflow and the worker's credentials, the two database URLs


def test_every_variable_is_in_env_example(compose):
    """infra/.env.example lists exactly the variables the compose file uses; every required one (no default)
    has a value there, and the example passwords are placeholders."""
    text = COMPOSE.read_text()
    used = {m.group(1) for m in VAR.finditer(text)}
    required = {m.group(1) for m in VAR.finditer(text) if not m.group(2)}
    example = _env_example()
    assert used == set(example), f"used, not listed: {used - set(example)}; listed, unused: {set(example) - used}"
    assert all(example[name] for name in required)
    for name, value in example.items():
        if "PASSWORD" in name:
            assert value.startswith("change") and value.isalnum(), f"{name}={value!r}"


def test_urls_are_well_formed_with_the_example_values(compose):
    """With infra/.env.example filled in, the database and artifact URLs point at the compose services, and
    the MLflow server accepts the Host header the worker sends (MLflow's own host check)."""
    from mlflow.server.security_utils import is_allowed_host_header

    env = _env_example()
    rendered = yaml.safe_load(_interpolate(COMPOSE.read_text(), env))
    services = rendered["services"]
    prefect_db = urlsplit(services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (prefect_db.scheme, prefect_db.hostname, prefect_db.port, prefect_db.path) == (
        "postgresql+asyncpg", "postgres", 5432, "/prefect")
    assert (prefect_db.username, prefect_db.password) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"])
    args = dict(a.removeprefix("--").split("=", 1) for a in services["mlflow"]["command"] if "=" in a)
    mlflow_db = urlsplit(args["backend-store-uri"])
    assert (mlflow_db.scheme, mlflow_db.hostname, mlflow_db.path) == ("postgresql", "postgres", "/mlflow")
    assert args["artifacts-destination"] == f"s3://{env['ARBORL_BUCKET']}/mlflow"
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    allowed = args["allowed-hosts"].split(",")
    assert is_allowed_host_header(allowed, "mlflow:5000") and is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "evil.example.com")
    bucket_cmd = services["minio-init"]["command"][0]
    assert "mc mb --ignore-existing" in bucket_cmd and "$MINIO_ROOT_PASSWORD" in bucket_cmd


def test_databases_and_mlflow_image():
    """The init script creates both servers' databases; the MLflow image has the PostgreSQL driver and boto3
    and the project's MLflow version range."""
    sql = (INFRA / "postgres" / "init.sql").read_text()
    assert re.findall(r"CREATE DATABASE (\w+);", sql) == ["prefect", "mlflow"]
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert "psycopg2-binary" in dockerfile and "boto3" in dockerfile
    pinned = re.search(r'"mlflow==(\d+)\.(\d+)\.\d+"', dockerfile)
    pyproject = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"mlflow>=(\d+\.\d+),<(\d+\.\d+)"', pyproject).groups()
    version = (int(pinned.group(1)), int(pinned.group(2)))
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
