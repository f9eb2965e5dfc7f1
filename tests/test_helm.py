"""The Helm snippets in deploy/helm/, for the official MLflow chart, community-charts/mlflow and bitnami/mlflow.

There is no cluster and no Helm here, so each snippet is checked the way tests/test_deploy.py checks the
Kubernetes examples, then its environment layout is run for real:

* parsed; each chart's templating emulated for the few expressions the snippets use (the chart's own
  helpers, as their sources define them; an expression the test does not know fails it);
* every init container, volume and Job checked against the Kubernetes API models (the official client's);
* the image is this version's; each command line is accepted by the image's ``--help``; every variable a
  container gets is documented by that ``--help``, or is only there for the kubelet to expand in ``args``;
* run: the chart's ConfigMap and Secret layout made for a test server (the values the chart would put
  there), the environment built as the kubelet builds it (envFrom, then env; ``$(VAR)`` expanded as the
  kubelet expands it), secret volumes as files where the snippet mounts them, under the user id the chart
  gives the pod; the init container, then the post-upgrade Job, with the image (``docker run``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, Db
from tests.logins import Login, create_login
from tests.test_deploy import schema_errors
from tests.test_image import IMAGE, build_image, gateway_data, tagged
from tests.test_image_credentials import LOCAL_IMAGE, docker

HELM = REPO / "deploy" / "helm"


@pytest.fixture(scope="session")
def image() -> str:
    build_image()  # `make image`, which honours MGB_IMAGE_NAME
    return LOCAL_IMAGE


RELEASE = "mlflow"  # the release name the snippets' comments assume; <fullname> is then "mlflow"
TEMPLATE = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def dig(values: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        values = values[key]
    return values


def with_path(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        values = values.setdefault(key, {})
    values[last] = value


# The chart helpers the snippets call, as each chart defines them (release "mlflow", chart "mlflow").
def _community_helpers(values: dict[str, Any]) -> dict[str, str]:
    # charts/mlflow/templates/_helpers.tpl: "mlflow.fullname" is the release name when it contains the chart's.
    return {"mlflow.fullname": RELEASE}


def _bitnami_helpers(values: dict[str, Any]) -> dict[str, str]:
    # bitnami/mlflow/templates/_helpers.tpl, with postgresql.enabled false: the externalDatabase.* values;
    # the Secret is externalDatabase.existingSecret, else "<fullname>-externaldb".
    db = values["externalDatabase"]
    assert values["postgresql"]["enabled"] is False
    return {
        "common.names.fullname": RELEASE,
        "common.names.namespace": "default",
        "mlflow.v0.database.secretName": db.get("existingSecret") or f"{RELEASE}-externaldb",
        "mlflow.v0.database.passwordKey": db["existingSecretPasswordKey"],
        "mlflow.v0.database.dialectDriver": db["dialectDriver"] if "dialectDriver" in db else "postgresql",
        "mlflow.v0.database.user": db["user"],
        "mlflow.v0.database.host": db["host"],
        "mlflow.v0.database.port": str(int(db["port"])),
        "mlflow.v0.database.name": db["database"],
    }


def render(node: Any, values: dict[str, Any], helpers: dict[str, str]) -> Any:
    """Helm's ``tpl`` on every string of ``node``, for ``include "helper" .`` and ``.Values.x.y``."""
    if isinstance(node, dict):
        return {k: render(v, values, helpers) for k, v in node.items()}
    if isinstance(node, list):
        return [render(v, values, helpers) for v in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match[str]) -> str:
        expression = match.group(1)
        if included := re.fullmatch(r'include "([\w.]+)" \.', expression):
            assert included.group(1) in helpers, f"a helper the test does not know: {expression}"
            return helpers[included.group(1)]
        if expression.startswith(".Values."):
            return str(dig(values, expression[len(".Values.") :]))
        raise AssertionError(f"a template expression the test does not know: {expression}")

    return TEMPLATE.sub(one, node)


@dataclass
class Snippet:
    """One chart's snippet: where the chart reads each part, and how the chart lays out the database's
    settings (ConfigMaps, Secrets) for a given server."""

    name: str
    file: str
    init_containers: str  # dotted values key
    volumes: str | None  # dotted values key of the pod's extra volumes
    templated: bool  # the chart runs tpl over initContainers / extraVolumes
    helpers: Callable[[dict[str, Any]], dict[str, str]]
    job_file: str | None = None  # the post-upgrade Job, when the chart has no extraDeploy
    database_values: dict[str, str] = field(default_factory=dict)  # dotted key -> what to set from the login
    user: str | None = None  # the pod's user id (docker --user); None: the image's

    def values(self) -> dict[str, Any]:
        return yaml.safe_load((HELM / self.file).read_text())

    def jobs(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        if self.job_file:
            return [yaml.safe_load((HELM / self.job_file).read_text())]
        return [render(obj, values, self.helpers(values)) for obj in values.get("extraDeploy", [])]

    def init(self, values: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The init containers and the pod's extra volumes, as the chart renders them."""
        containers = dig(values, self.init_containers)
        volumes = dig(values, self.volumes) if self.volumes and _has(values, self.volumes) else []
        if self.templated:
            containers, volumes = render([containers, volumes], values, self.helpers(values))
        return containers, volumes


def _has(values: dict[str, Any], dotted: str) -> bool:
    try:
        dig(values, dotted)
        return True
    except KeyError:
        return False


SNIPPETS = {
    "official": Snippet(
        "official",
        "mlflow.values.yaml",
        "extraInitContainers",
        "extraVolumes",
        templated=False,
        helpers=lambda values: {},
        job_file="mlflow.post-upgrade-job.yaml",
        user="1000:0",  # charts/values.yaml: podSecurityContext.runAsUser 1000 (OpenShift: its own)
    ),
    "community-postgres": Snippet(
        "community-postgres",
        "community-charts-mlflow.postgres.values.yaml",
        "initContainers",
        "extraVolumes",
        templated=False,
        helpers=_community_helpers,
        database_values={
            "backendStore.postgres.host": "host",
            "backendStore.postgres.port": "port",
            "backendStore.postgres.database": "database",
        },
    ),
    "community-mysql": Snippet(
        "community-mysql",
        "community-charts-mlflow.mysql.values.yaml",
        "initContainers",
        "extraVolumes",
        templated=False,
        helpers=_community_helpers,
        database_values={
            "backendStore.mysql.host": "host",
            "backendStore.mysql.port": "port",
            "backendStore.mysql.database": "database",
        },
    ),
    "bitnami": Snippet(
        "bitnami",
        "bitnami-mlflow.values.yaml",
        "tracking.initContainers",
        "tracking.extraVolumes",
        templated=True,
        helpers=_bitnami_helpers,
        database_values={
            "externalDatabase.host": "host",
            "externalDatabase.port": "port",
            "externalDatabase.database": "database",
            "externalDatabase.user": "user",
        },
        user="random:0",  # OpenShift: a random user id in group 0 (elsewhere bitnami's 1001)
    ),
}


def all_containers(snippet: Snippet, values: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[dict]]]:
    """(where, container, the volumes of its pod) for each init container and each Job's container."""
    containers, volumes = snippet.init(values)
    found = [(f"{snippet.name} init/{c['name']}", c, volumes) for c in containers]
    for job in snippet.jobs(values):
        pod = job["spec"]["template"]["spec"]
        found += [(f"{snippet.name} job/{c['name']}", c, pod.get("volumes", [])) for c in pod["containers"]]
    return found


@pytest.mark.parametrize("name", list(SNIPPETS))
def test_snippets_match_the_kubernetes_api_models(name: str) -> None:
    """Every init container, volume and Job field against the Kubernetes API's models; Jobs also through the
    client's deserializer (a missing required field fails); the hooks are post-install,post-upgrade."""
    from kubernetes.client import ApiClient

    snippet = SNIPPETS[name]
    values = snippet.values()
    containers, volumes = snippet.init(values)
    assert containers, "no init container"
    assert schema_errors(containers, "List[V1Container]", f"{name} initContainers") == []
    assert schema_errors(volumes, "List[V1Volume]", f"{name} volumes") == []
    jobs = snippet.jobs(values)
    assert len(jobs) == 1
    for job in jobs:
        assert schema_errors(job, "V1Job", f"{name} Job") == []
        ApiClient()._ApiClient__deserialize(job, "V1Job")
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    for where, container, pod_volumes in all_containers(snippet, values):
        assert container["image"] == IMAGE, where
        assert "command" not in container, f"{where}: the image's entry point must stay"
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounted <= {v["name"] for v in pod_volumes}, where


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it in args and env values: a defined variable's value, ``$$`` a
    literal ``$``, anything else (an undefined ``$(VAR)`` included) left as it is."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def expanded_names(container: dict[str, Any]) -> set[str]:
    return {n for arg in container.get("args", []) for n in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg)}


@pytest.mark.image
@pytest.mark.parametrize("name", list(SNIPPETS))
def test_snippet_command_lines_and_variables_are_the_images(image: str, name: str) -> None:
    """The image accepts each container's arguments (its ``--help`` after them exits 0 and lists each
    option); every variable the container gets (env and the chart's ConfigMap/Secret keys) is documented by
    that ``--help``, or is there only for the kubelet to expand in args."""
    snippet = SNIPPETS[name]
    values = snippet.values()
    configmaps, secret_data = layout(snippet, values, None)
    for where, container, _ in all_containers(snippet, values):
        args = container["args"]
        helped = docker(image, *args, "--help")
        assert helped.returncode == 0, f"{where}: {helped.stdout}{helped.stderr}"
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in helped.stdout, f"{where}: {option}"
        names = set(environment(container, configmaps, secret_data)) - set(COMMUNITY_MLFLOW_SETTINGS)
        documented = set(re.findall(r"\$([A-Z_]+)", helped.stdout))
        assert names - expanded_names(container) <= documented, f"{where}: {names - documented}"


# Keys of community-charts/mlflow's ConfigMap that are settings for MLflow, not the database; the tool does
# not read them.
COMMUNITY_MLFLOW_SETTINGS = {
    "MLFLOW_CONFIGURE_LOGGING": "true",
    "MLFLOW_LOGGING_LEVEL": "INFO",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def layout(snippet: Snippet, values: dict[str, Any], login: Login | None) -> tuple[dict, dict]:
    """The ConfigMaps and Secrets (name -> data) the snippet's containers read, as the chart and the
    operator make them for ``login`` (placeholders without one)."""
    user, password = (login.user, login.password) if login else ("u", "p")
    host, port, database = (login.host, str(login.port), login.database) if login else ("h", "1", "d")
    if snippet.name == "official":  # the operator's Secret with MLflow's URL (percent-encoded)
        url = login.url_with(password) if login else "postgresql://u:p@h/d"
        return {}, {"mlflow-db-secret": {"uri": url}}
    if snippet.name.startswith("community"):
        existing = values["backendStore"]["existingDatabaseSecret"]["name"]
        credentials = {existing: {"username": user, "password": password}}
        # charts/mlflow/templates/configmap.yaml: the database's keys (postgres.enabled or mysql.enabled), then
        # the chart's settings for MLflow itself with the chart's defaults (log.enabled, log.level "info",
        # telemetry.enabled false).
        if snippet.name == "community-postgres":
            configmap = {"PGHOST": host, "PGPORT": port, "PGDATABASE": database}
        else:
            configmap = {"MYSQL_HOST": host, "MYSQL_TCP_PORT": port, "MYSQL_DATABASE": database}
        configmap |= COMMUNITY_MLFLOW_SETTINGS
        return {f"{RELEASE}-env-configmap": configmap}, credentials
    db = values["externalDatabase"]  # bitnami: externalDatabase.existingSecret, key existingSecretPasswordKey
    return {}, {db["existingSecret"]: {db["existingSecretPasswordKey"]: password}}


def environment(container: dict[str, Any], configmaps: dict, secret_data: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom in order, then env (which wins), each
    env value expanded with what is defined before it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secret_data[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = kubelet_expand(item["value"], env)
        else:
            ref = item["valueFrom"].get("secretKeyRef") or item["valueFrom"]["configMapKeyRef"]
            pool = secret_data if "secretKeyRef" in item["valueFrom"] else configmaps
            env[item["name"]] = pool[ref["name"]][ref["key"]]
    return env


def mounted_files(container: dict[str, Any], volumes: list[dict], secret_data: dict, tmp: Path) -> dict[Path, str]:
    """The container's secret volumes as directories of files (host path -> mount path), as the kubelet
    projects them: each item's key to its path, mode 0644."""
    by_name = {v["name"]: v for v in volumes}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]["secret"]
        directory = tmp / f"{mount['name']}-{secrets.token_hex(3)}"
        directory.mkdir()
        directory.chmod(0o755)
        data = secret_data[volume["secretName"]]
        for item in volume.get("items") or [{"key": k, "path": k} for k in data]:
            path = directory / item["path"]
            path.write_text(data[item["key"]])
            path.chmod(0o644)
        mounts[directory] = mount["mountPath"]
    return mounts


def run_snippet(image: str, name: str, db: Db, tmp_path: Path) -> None:
    """The snippet's layout for real: the init container, then the post-upgrade Job, each as the kubelet
    would run it, on MLflow 3.10-style data with a login whose password needs percent-encoding in a URL."""
    snippet = SNIPPETS[name]
    data = gateway_data(db)
    login = create_login(db)
    values = snippet.values()
    for key, attribute in snippet.database_values.items():  # the operator's values for this server
        with_path(values, key, getattr(login, attribute))
    configmaps, secret_data = layout(snippet, values, login)
    user = snippet.user
    if user and user.startswith("random"):
        user = f"{secrets.randbelow(10**9) + 100_000}:0"
    results = []
    for where, container, volumes in all_containers(snippet, values):
        env = environment(container, configmaps, secret_data)
        args = [kubelet_expand(a, env) for a in container["args"]]
        mounts = mounted_files(container, volumes, secret_data, tmp_path)
        result = docker(image, *args, env=env, user=user, mounts=mounts)
        assert result.returncode == 0, f"{where}: {result.stdout}{result.stderr}"
        assert login.password not in result.stdout + result.stderr
        results.append(result.stdout)
    init_output, job_output = results
    assert f"inserted {len(data.gateway + data.deleted_gateway)} isGateway tags" in init_output
    assert "nothing to do" in job_output
    assert tagged(db) == set(data.gateway + data.deleted_gateway)


@pytest.mark.image
@pytest.mark.backends("postgresql", "mysql")
def test_official_chart_layout_runs(image: str, db: Db, tmp_path: Path) -> None:
    """The official chart: MLFLOW_BACKEND_STORE_URI from the Secret mlflow.backendStoreUriFrom names."""
    run_snippet(image, "official", db, tmp_path)


@pytest.mark.image
@pytest.mark.backends("postgresql")
def test_community_chart_postgres_layout_runs(image: str, db: Db, tmp_path: Path) -> None:
    """community-charts/mlflow on PostgreSQL: ``postgresql://`` with PGHOST/PGPORT/PGDATABASE from the chart's
    ConfigMap and PGUSER/PGPASSWORD from existingDatabaseSecret."""
    run_snippet(image, "community-postgres", db, tmp_path)


@pytest.mark.image
@pytest.mark.backends("mysql")
def test_community_chart_mysql_layout_runs(image: str, db: Db, tmp_path: Path) -> None:
    """community-charts/mlflow on MySQL / MariaDB: the URL from $(MYSQL_USERNAME), $(MYSQL_HOST), ... expanded
    by the kubelet, the password (with '@', '/', ':', '%') from the Secret mounted as a file."""
    run_snippet(image, "community-mysql", db, tmp_path)


@pytest.mark.image
@pytest.mark.backends("postgresql")
def test_bitnami_chart_layout_runs(image: str, db: Db, tmp_path: Path) -> None:
    """bitnami/mlflow: the URL from the chart's own helpers without the password, the password (with '@',
    '/', ':', '%', which the chart's own URL could not carry) from externalDatabase.existingSecret as a file,
    under a random user id in group 0."""
    run_snippet(image, "bitnami", db, tmp_path)


@pytest.mark.image
@pytest.mark.backends("postgresql")
def test_bitnami_chart_own_url_cannot_carry_such_a_password(image: str, db: Db) -> None:
    """Why the bitnami snippet reads the password from a file: the chart's own URL,
    postgresql://user:$(MLFLOW_DATABASE_PASSWORD)@host:port/db, expanded by the kubelet with a password
    holding '@' and '/', is not a URL any more (refused with exit 2, the password not shown)."""
    login = create_login(db)
    url = kubelet_expand(
        f"postgresql://{login.user}:$(MLFLOW_DATABASE_PASSWORD)@{login.host}:{login.port}/{login.database}",
        {"MLFLOW_DATABASE_PASSWORD": login.password},
    )
    result = docker(image, "status", "--database-url", url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unencoded character" in result.stderr
    assert login.password not in result.stdout + result.stderr
