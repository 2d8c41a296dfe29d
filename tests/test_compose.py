"""docker-compose.yml (+ the single-host override) and the Dockerfile checked against the code (no
Docker engine needed): the services exist, their commands parse with the real ``dpaat`` CLI, the
environment names every setting of ``app.core.settings.Settings`` and nothing else, and the
artifacts live in the MinIO bucket (issue 15) or, with the override, in one shared volume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from app.cli import cli
from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DPAAT_SERVICES = ("migrate", "api", "worker", "scheduler", "worker-gpu", "worker-predict")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def single_host() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.single-host.yml").read_text())
    assert isinstance(data, dict)
    return data


def _settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a container with this environment reads them."""
    known = {name for field in Settings.model_fields for name in _env_names(field)}
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if value is not None:  # a name without a value stays unset in the container
            monkeypatch.setenv(name, str(_interpolate(value)))
    return Settings()


def _env_names(field: str) -> set[str]:
    """The environment variables a Settings field is read from."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return {str(c) for c in choices}
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{field}".upper()}


def _interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` with the shell empty: the default."""
    if not isinstance(value, str):
        return value
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_every_service_is_defined(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"postgres", "redis", "minio", "minio-init", *DPAAT_SERVICES}


def test_commands_parse_with_the_real_cli(compose: dict[str, Any]) -> None:
    group = typer.main.get_command(cli)
    commands = group.commands  # type: ignore[attr-defined]
    expected = {
        "migrate": "migrate",
        "api": "serve",
        "worker": "worker",
        "scheduler": "worker",
        "worker-gpu": "worker",
        "worker-predict": "worker",
    }
    for name, subcommand in expected.items():
        argv = [_interpolate(a) for a in _command(compose["services"][name])]
        assert argv[:2] == ["dpaat", subcommand], name
        command = commands[subcommand]
        # make_context parses the options exactly as the CLI would (a typo raises here).
        ctx = command.make_context(subcommand, argv[2:])
        if name == "api":
            assert ctx.params["host"] == "0.0.0.0"  # reachable from outside the container
        if name == "scheduler":
            assert ctx.params["beat"] is True
        if name in ("worker", "worker-gpu"):  # training/evaluation, never predictions
            assert ctx.params["queues"].split(",") == ["train", "evaluate"], name
        if name == "worker-predict":  # predictions only: batched in one process
            assert ctx.params["queues"] == "predict" and ctx.params["pool"] is None
    beats = [n for n in DPAAT_SERVICES if "--beat" in _command(compose["services"][n])]
    assert beats == ["scheduler"], "exactly one process must run the reaper schedule"


def test_environment_names_every_setting_and_nothing_else(compose: dict[str, Any]) -> None:
    known = {name for field in Settings.model_fields for name in _env_names(field)}
    for service in DPAAT_SERVICES:
        env = compose["services"][service]["environment"]
        assert isinstance(env, dict), f"{service}: environment must be a mapping"
        unknown = set(env) - known
        assert not unknown, f"{service} sets variables Settings does not read: {unknown}"
        missing = [f for f in Settings.model_fields if not _env_names(f) & set(env)]
        assert not missing, f"{service} does not name the settings {missing}"


def test_environment_values_make_a_full_deployment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["api"]["environment"]
    settings = _settings_from(env, monkeypatch)
    assert not settings.embedded
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in settings.database_url
    assert settings.broker_url is not None and settings.broker_url.startswith("redis://redis:")
    assert settings.environment == "production"
    assert settings.artifact_dir.is_absolute()
    assert settings.auto_migrate is False
    # API and workers must agree on everything that crosses a process boundary.
    for service in DPAAT_SERVICES:
        assert compose["services"][service]["environment"] == env, service


def test_artifacts_go_to_the_minio_bucket_and_no_volume_is_shared(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    settings = _settings_from(services["api"]["environment"], monkeypatch)
    assert settings.object_storage and settings.artifacts == "s3://dpaat/artifacts"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_access_key_id == _interpolate(
        services["minio"]["environment"]["MINIO_ROOT_USER"]
    )
    secret = settings.s3_secret_access_key
    assert secret is not None
    assert secret.get_secret_value() == _interpolate(
        services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    )
    assert settings.cache_dir.is_absolute() and settings.scratch_dir.is_absolute()
    # stateless containers: nothing but the read-only data folder is mounted
    for service in DPAAT_SERVICES:
        mounts = [str(v) for v in services[service].get("volumes", [])]
        assert all(m.endswith(":ro") for m in mounts), (service, mounts)
    # the one-off creates the bucket the settings name, once MinIO is healthy
    init = services["minio-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script
    assert _interpolate(init["environment"]["DPAAT_BUCKET"]) == "dpaat"
    assert "healthcheck" in services["minio"] and "miniodata" in compose["volumes"]


def test_single_host_override_shares_one_artifacts_volume(
    compose: dict[str, Any], single_host: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    override = single_host["services"]
    target = compose["services"]["api"]["environment"]["DPAAT_ARTIFACT_DIR"]
    for service in DPAAT_SERVICES:
        mounts = [str(v).split(":")[:2] for v in override[service]["volumes"]]
        assert ["artifacts", target] in mounts, service
        # compose merges environment maps key by key: the override's value wins
        env = {**compose["services"][service]["environment"], **override[service]["environment"]}
        settings = _settings_from(env, monkeypatch)
        assert not settings.object_storage and settings.artifact_dir == Path(target), service
    assert override["minio"]["profiles"] and override["minio-init"]["profiles"]
    assert "artifacts" in single_host["volumes"]
    for service in set(DPAAT_SERVICES) - {"migrate"}:  # so the disabled one-off may be absent
        dep = compose["services"][service]["depends_on"]["minio-init"]
        assert dep == {"condition": "service_completed_successfully", "required": False}


def test_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "scheduler", "worker-gpu", "worker-predict"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]


def test_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "profiles" not in compose["services"]["worker"], "the CPU worker runs by default"


def test_dockerfile_is_multi_stage_with_pinned_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, flags=re.MULTILINE)
    assert [s[1] for s in stages] == ["builder", "runtime"]
    assert stages[1][0].endswith("-slim")
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert "pip install" not in runtime, "the runtime stage installs nothing"
    assert re.search(r"^USER\s+(?!root)\w+", runtime, flags=re.MULTILINE), "not as root"
