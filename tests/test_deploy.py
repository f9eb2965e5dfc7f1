"""The deployment examples in deploy/ checked against what they call, with what this machine can run.

Kubernetes has no cluster here, so the manifests are parsed and every reference is checked against the real
thing: the backfill image's entry point, subcommands, options and documented environment variables (its own
``--help``, run through ``docker run``), MLflow's command line (its click commands, from the installed
``mlflow``), the Secret they read, the image's user. The compose file is also normalised by a real compose
implementation (``docker compose config`` or Debian's ``docker-compose config``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from backfill.errors import ExitCode
from tests.conftest import REPO
from tests.mlflow_data import populate
from tests.test_image import IMAGE, build_image, docker_run

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
BACKFILL_REPO = "mlflow-gateway-backfill"
MLFLOW_IMAGE = re.compile(r"mlflow-server:(\d+\.\d+\.\d+)")


@pytest.fixture(scope="session")
def image() -> str:
    return build_image()


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_containers() -> list[tuple[str, str, dict[str, Any]]]:
    """(workload name, "init" / "main", container) for every container of every workload."""
    found = []
    for doc in k8s_docs():
        if doc["kind"] in ("Job", "Deployment"):
            pod = doc["spec"]["template"]["spec"]
            found += [(doc["metadata"]["name"], "init", c) for c in pod.get("initContainers", [])]
            found += [(doc["metadata"]["name"], "main", c) for c in pod["containers"]]
    return found


def backfill_invocations() -> list[tuple[str, list[str], list[str]]]:
    """(where, args, env names) of every place the backfill image runs: Kubernetes containers, compose services."""
    found = []
    for workload, _, c in k8s_containers():
        if c["image"].startswith(BACKFILL_REPO):
            assert "command" not in c, f"{workload}/{c['name']}: the image's entry point must stay"
            found.append((f"{workload}/{c['name']}", c["args"], [e["name"] for e in c.get("env", [])]))
    for name, service in compose()["services"].items():
        if service["image"].startswith(BACKFILL_REPO):
            assert "entrypoint" not in service, f"compose {name}: the image's entry point must stay"
            found.append((f"compose {name}", service["command"], list(service.get("environment", {}))))
    return found


def mlflow_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every MLflow command line the examples run (argv[0] == "mlflow")."""
    found = []
    for workload, _, c in k8s_containers():
        if MLFLOW_IMAGE.search(c["image"]):
            found.append((f"{workload}/{c['name']}", c["command"]))
    for name, service in compose()["services"].items():
        if MLFLOW_IMAGE.search(service["image"]):
            argv = service["command"]
            if argv[:2] == ["sh", "-c"]:  # `sh -c 'exec mlflow ...'`: the command line the shell runs
                argv = shlex.split(argv[2].replace("$$", "$"))
                argv = argv[1:] if argv[0] == "exec" else argv
            found.append((f"compose {name}", argv))
    return found


@functools.cache
def help_text(*args: str) -> str:
    """``docker run --rm IMAGE ARGS --help``: exit 0 proves every subcommand and option in ARGS exists."""
    result = docker_run(IMAGE, *args, "--help")
    assert result.returncode == 0, f"{IMAGE} {' '.join(args)} --help: {result.stdout}{result.stderr}"
    return result.stdout


def schema_errors(value: Any, type_name: str, path: str) -> list[str]:
    """Fields of ``value`` that the Kubernetes API model ``type_name`` does not have, or of the wrong type."""
    import kubernetes.client

    if type_name.startswith("List["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("Dict["):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{path}.{k}")]
    primitives: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
    if type_name in primitives:
        ok = isinstance(value, primitives[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":  # int-or-string (ports) and free-form values
        return []
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    fields = {json_name: model.openapi_types[attr] for attr, json_name in model.attribute_map.items()}
    errors = [f"{path}.{key}: no such field in {type_name}" for key in value if key not in fields]
    return errors + [e for k, v in value.items() if k in fields for e in schema_errors(v, fields[k], f"{path}.{k}")]


def test_kubernetes_manifests_match_the_api_models() -> None:
    """Every field name and type against the Kubernetes API's models (the official Python client's), and the
    required fields through its deserializer, which rejects a missing one."""
    from kubernetes.client import ApiClient

    client = ApiClient()
    for doc in k8s_docs():
        group_version = doc["apiVersion"].split("/")[-1]
        type_name = f"{group_version.capitalize()}{doc['kind']}"
        assert schema_errors(doc, type_name, f"{doc['kind']}/{doc['metadata']['name']}") == []
        client._ApiClient__deserialize(doc, type_name)  # raises ValueError on a missing required field


def test_every_file_parses_and_has_the_expected_kinds() -> None:
    kinds = sorted(doc["kind"] for doc in k8s_docs())
    assert kinds == ["Deployment", "Job", "Secret", "Service"]
    assert set(compose()["services"]) == {"db", "db-upgrade", "backfill", "mlflow"}


def test_backfill_image_references_are_this_version() -> None:
    """Every reference names this version's image (a version bump must update deploy/ too)."""
    images = [c["image"] for _, _, c in k8s_containers() if c["image"].startswith(BACKFILL_REPO)]
    images += [s["image"] for s in compose()["services"].values() if s["image"].startswith(BACKFILL_REPO)]
    assert len(images) == 3
    assert set(images) == {IMAGE}


@pytest.mark.image
def test_backfill_image_reference_exists_and_runs_as_configured(image: str) -> None:
    """The referenced image is the one `make image` builds, and the pods' user is the image's own."""
    inspect = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, check=True)
    user = json.loads(inspect.stdout)[0]["Config"]["User"]
    uid, gid = (int(v) for v in user.split(":"))
    for doc in k8s_docs():
        if doc["kind"] not in ("Job", "Deployment"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["image"].startswith(BACKFILL_REPO):
                context = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
                assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
                assert context["runAsNonRoot"] is True


@pytest.mark.image
def test_backfill_commands_and_options_exist_in_the_image(image: str) -> None:
    invocations = backfill_invocations()
    assert invocations
    commands = help_text()
    for where, args, _ in invocations:
        assert re.search(rf"^\s+{re.escape(args[0])}\s", commands, re.M), f"{where}: no subcommand {args[0]!r}"
        text = help_text(*args)  # exit 0: click accepted every option of args
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in text, f"{where}: {option} is not an option of {args[0]}"


@pytest.mark.image
def test_backfill_env_vars_are_the_documented_ones(image: str) -> None:
    """Each variable the examples set is one the command's own help names as a source of the database URL."""
    for where, args, names in backfill_invocations():
        assert names, f"{where}: no database URL given"
        documented = set(re.findall(r"\$([A-Z_]+)", help_text(args[0])))
        assert set(names) <= documented, f"{where}: {sorted(set(names) - documented)} not in `{args[0]} --help`"


def test_kubernetes_env_comes_from_the_example_secret() -> None:
    secret = next(doc for doc in k8s_docs() if doc["kind"] == "Secret")
    refs = set()
    for workload, _, c in k8s_containers():
        env = {e["name"]: e for e in c.get("env", [])}
        assert "MLFLOW_BACKEND_STORE_URI" in env, f"{workload}/{c['name']}"
        ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    assert refs == {(secret["metadata"]["name"], next(iter(secret["stringData"])))}


def test_job_runs_once_and_fails_fast_only_on_permanent_errors() -> None:
    job = next(doc for doc in k8s_docs() if doc["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert [c["args"][0] for c in pod["containers"]] == ["run"]
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
    assert set(rule["onExitCodes"]["values"]) == {ExitCode.USAGE, ExitCode.NOT_MLFLOW, ExitCode.PERMISSION}


def test_deployment_upgrades_then_backfills_then_serves() -> None:
    deployment = next(doc for doc in k8s_docs() if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    first, second = pod["initContainers"]
    assert first["command"][:3] == ["mlflow", "db", "upgrade"]
    assert second["image"] == IMAGE and second["args"][0] == "run"
    (server,) = pod["containers"]
    assert server["command"][:2] == ["mlflow", "server"]
    service = next(doc for doc in k8s_docs() if doc["kind"] == "Service")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_compose_orders_the_services() -> None:
    services = compose()["services"]
    assert services["mlflow"]["depends_on"] == {"backfill": {"condition": "service_completed_successfully"}}
    assert services["backfill"]["depends_on"] == {"db-upgrade": {"condition": "service_completed_successfully"}}
    assert services["db-upgrade"]["depends_on"] == {"db": {"condition": "service_healthy"}}


def _mlflow_command(argv: list[str]) -> tuple[click.Command, list[str]]:
    """Resolve ``mlflow GROUP ... COMMAND ARGS`` to the click command and its arguments."""
    from mlflow.cli import cli

    command: click.Command = cli
    rest = argv[1:]
    while isinstance(command, click.Group):
        command = command.commands[rest[0]]
        rest = rest[1:]
    return command, rest


def test_mlflow_command_lines_are_valid() -> None:
    """MLflow's own click commands accept each command line, and the server reads the URL from the env."""
    commands = mlflow_commands()
    assert len(commands) == 4  # db upgrade and server, in Kubernetes and compose
    for where, argv in commands:
        assert argv[0] == "mlflow", where
        command, rest = _mlflow_command(argv)
        command.make_context(command.name, list(rest))  # raises on an unknown option or a missing argument
        if command.name == "upgrade":
            assert rest == ["$(MLFLOW_BACKEND_STORE_URI)"] or rest == ["$MLFLOW_BACKEND_STORE_URI"], where
    server, _ = _mlflow_command(["mlflow", "server"])
    store_option = next(p for p in server.params if p.name == "backend_store_uri")
    assert store_option.envvar == "MLFLOW_BACKEND_STORE_URI"


def test_mlflow_server_dockerfile_pins_what_the_tests_run() -> None:
    """deploy/mlflow-server/Dockerfile installs exactly the versions of requirements/mlflow-server.in (which the
    compose end-to-end test and the screenshots run), and the manifests' image tags name that MLflow."""
    dockerfile = (DEPLOY / "mlflow-server" / "Dockerfile").read_text()
    pins = dict(re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[\w+\])?==([^\s"]+)', dockerfile))
    tested = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)(?:\[\w+\])?==(\S+)", (REPO / "requirements" / "mlflow-server.in").read_text(), re.M
        )
    )
    assert pins == tested
    tags = {MLFLOW_IMAGE.search(c["image"]).group(1) for _, _, c in k8s_containers() if MLFLOW_IMAGE.search(c["image"])}
    tags |= {
        MLFLOW_IMAGE.search(s["image"]).group(1)
        for s in compose()["services"].values()
        if "mlflow-server" in s["image"]
    }
    assert tags == {pins["mlflow"]}


def compose_command() -> list[str]:
    """``docker compose`` (v2) if the client has it, else Debian's ``docker-compose``; fails when neither exists."""
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if v2.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose implementation: run scripts/ensure-compose.sh (Debian's docker-compose)", pytrace=False)


def test_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """A real compose implementation normalises the file; the order survives, and the password is required."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "POSTGRES_PASSWORD": "example-pw"}
    command = [*compose_command(), "--project-directory", str(DEPLOY), "-f", str(COMPOSE)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert services["mlflow"]["depends_on"]["backfill"]["condition"] == "service_completed_successfully"
    assert services["backfill"]["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
    url = "postgresql://mlflow:example-pw@db:5432/mlflow"
    assert {s["environment"]["MLFLOW_BACKEND_STORE_URI"] for n, s in services.items() if n != "db"} == {url}
    assert services["backfill"]["image"] == IMAGE

    del env["POSTGRES_PASSWORD"]
    missing = subprocess.run([*command, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0
    assert "POSTGRES_PASSWORD" in missing.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Any, what: str, seconds: float = 240) -> None:
    """Poll ``check()`` until it returns true; fail with ``what`` when ``seconds`` run out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}", pytrace=False)


def mlflow_experiments(port: int, ui_filter: bool) -> set[str]:
    """Names of the active experiments the MLflow server lists, with the UI's own filter or without."""
    query = {"max_results": "100"}
    if ui_filter:
        query["filter"] = "tags.`mlflow.experiment.isGateway` IS NULL"
    url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return {e["name"] for e in json.load(response).get("experiments", [])}


@pytest.mark.image
def test_compose_upgrades_backfills_then_serves(image: str, tmp_path: Path) -> None:
    """deploy/compose.yaml for real, on an MLflow 3.10 database with gateway experiments: MLflow 3.17.2's
    `db upgrade`, then the backfill, then the server, whose UI list no longer shows the gateway experiments.

    The images are local stand-ins (no registry here): PostgreSQL from the test images, MLflow from
    scripts/build-mlflow-server-image.sh (the same versions as deploy/mlflow-server/Dockerfile)."""
    from tests.backends import postgres_image

    uv = Path(sys.executable).with_name("uv")
    build = subprocess.run(
        ["scripts/build-mlflow-server-image.sh"],
        cwd=REPO,
        env={**os.environ, "UV": str(uv)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr
    version = re.search(r"mlflow==(\S+)", (REPO / "requirements" / "mlflow-server.txt").read_text())
    assert version
    password, db_port, mlflow_port = secrets.token_hex(8), free_port(), free_port()
    # Only for the test: the database published on the host, to write MLflow 3.10 data into it first.
    override = tmp_path / "override.yaml"
    override.write_text(f'services:\n  db:\n    ports: ["127.0.0.1:{db_port}:5432"]\n')
    env = {
        **os.environ,
        "POSTGRES_PASSWORD": password,
        "POSTGRES_IMAGE": postgres_image(),
        "MLFLOW_IMAGE": f"mlflow-gateway-backfill/mlflow-server:{version.group(1)}",
        "MLFLOW_PORT": str(mlflow_port),
    }
    project = f"mgb-pkg-e2e-{secrets.token_hex(4)}"
    compose_cli = [*compose_command(), "-p", project, "--project-directory", str(DEPLOY), "-f", str(COMPOSE)]
    compose_cli += ["-f", str(override)]

    def compose_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose_cli, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def exit_code(service: str) -> int:
        container = (
            compose_run("ps", "-a", "-q", service).stdout.split() or compose_run("ps", "-q", service).stdout.split()
        )
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", *container], capture_output=True, text=True
        )
        return int(state.stdout)

    try:
        started = compose_run("up", "-d", "--no-build", "db")
        assert started.returncode == 0, started.stderr
        url = f"postgresql+psycopg://mlflow:{password}@127.0.0.1:{db_port}/mlflow"
        wait_for(lambda: populate(url, gateway=3, ordinary=2, deleted_gateway=1), "the database to take MLflow data")

        up = compose_run("up", "-d", "--no-build")
        assert up.returncode == 0, up.stderr + compose_run("logs", "--no-color", "db-upgrade", "backfill").stdout
        wait_for(lambda: mlflow_experiments(mlflow_port, ui_filter=False), "the MLflow server")
        assert exit_code("db-upgrade") == 0
        assert exit_code("backfill") == 0
        logs = compose_run("logs", "--no-color", "backfill").stdout
        assert "inserted 4 isGateway tags" in logs

        everything = mlflow_experiments(mlflow_port, ui_filter=False)
        assert {"gateway/ep-0", "gateway/ep-1", "gateway/ep-2", "ordinary-0", "ordinary-1"} <= everything
        assert mlflow_experiments(mlflow_port, ui_filter=True) == {"Default", "ordinary-0", "ordinary-1"}
    finally:
        compose_run("down", "-v", "--remove-orphans", timeout=300)
