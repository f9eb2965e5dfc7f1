"""Which database: the URL's source, its checks, and its normal form.

The same resolution serves the CLI, Alembic's ``env.py``, Make and the container image, in this order:
``--database-url`` (Alembic: ``-x database-url=``), ``$DATABASE_URL``, ``$MLFLOW_BACKEND_STORE_URI`` (what
``mlflow server`` and Helm charts use), ``$MLFLOW_TRACKING_URI`` when it is a database URI, and
``sqlite:///mlflow.db`` (MLflow's own default store).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from backfill.errors import BackfillError, ExitCode

DEFAULT_URL = "sqlite:///mlflow.db"
DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql")
SUPPORTED = ("sqlite", "postgresql", "mysql")
# The project's own drivers, whatever driver the URI names (plain postgresql:// means psycopg2 to
# SQLAlchemy, mysql:// mysqlclient): the retries, timeouts and watchdog rely on their error codes and
# sockets, and they are what the tests prove.
DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql"}
_ENCODING_HINT = (
    "; if the user or password holds any of @ / : ? # % [ ] or a space, percent-encode it "
    "(@ is %40, / is %2F, : is %3A, ? is %3F, # is %23, % is %25, a space is %20)"
)
# Query parameters that carry a secret (libpq's and PyMySQL's names): withheld from every message.
SECRET_PARAMETERS = ("password", "passwd", "sslpassword")


@dataclass(frozen=True)
class Resolved:
    """A database URL and where it came from (an option or an environment variable)."""

    url: str
    source: str


def _scheme(raw: str) -> str:
    return raw.split(":", 1)[0].split("+", 1)[0].lower()


def resolve_url(explicit: str | None = None) -> Resolved:
    """The database URL by the project's precedence rules (see the module docstring)."""
    if explicit:
        return Resolved(explicit, "--database-url")
    for name in ("DATABASE_URL", "MLFLOW_BACKEND_STORE_URI"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if name == "MLFLOW_BACKEND_STORE_URI" and _scheme(value) not in DB_SCHEMES:
            # A file store (./mlruns, file:///...): MLflow keeps no database, there is nothing to backfill.
            raise BackfillError(
                "MLFLOW_BACKEND_STORE_URI is not a database URI (a file store has no experiment_tags "
                "table): set --database-url or DATABASE_URL to the database",
                ExitCode.USAGE,
            )
        return Resolved(value, f"${name}")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if tracking and _scheme(tracking) in DB_SCHEMES:
        return Resolved(tracking, "$MLFLOW_TRACKING_URI")
    return Resolved(DEFAULT_URL, "the default")


def resolve_replicas(explicit: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The read replicas to wait for: those given, else ``$MLFLOW_READ_REPLICA_BACKEND_STORE_URI`` (what
    ``mlflow server --read-replica-backend-store-uri`` reads), else none."""
    if explicit:
        return tuple(explicit)
    from_env = os.environ.get("MLFLOW_READ_REPLICA_BACKEND_STORE_URI", "").strip()
    return (from_env,) if from_env else ()


def parse_url(raw: str) -> URL:
    """Parse a URL the way users give it to MLflow and normalise its driver.

    Refused with exit 2 and a message that never repeats the URL (it may hold a password): an
    unparseable URL, an unsupported database, a user or password with an unencoded ``@`` or ``/``
    (the rest would be taken for the host), a MySQL URL without a database.
    """
    scheme = _scheme(raw)
    try:
        url = sa.engine.make_url(raw)
    except (ArgumentError, ValueError):
        shown = f" (scheme {scheme!r})" if scheme and scheme.isidentifier() else ""
        raise BackfillError(
            f"malformed database URL{shown}: expected e.g. postgresql://user:password@host:5432/mlflow "
            f"or sqlite:///path/to/mlflow.db{_ENCODING_HINT if '@' in raw.partition('://')[2] else ''}",
            ExitCode.USAGE,
        ) from None
    backend = {"postgres": "postgresql", "mariadb": "mysql"}.get(url.get_backend_name(), url.get_backend_name())
    if backend not in SUPPORTED:
        raise BackfillError(
            f"unsupported database {url.get_backend_name()!r}: use sqlite, postgresql or mysql (MariaDB too)",
            ExitCode.USAGE,
        )
    if backend != "sqlite":
        # An unencoded '@' or '/' in the password moves the rest into the host or the database name; more than
        # one '@' before the path means one belongs to the user or password.
        authority = raw.split("://", 1)[-1].split("?", 1)[0]
        if (
            authority.count("@") > 1
            or (url.host and ("@" in url.host or "/" in url.host))
            or "@" in (url.database or "")
            or any("=" not in part and "@" in part for part in raw.partition("?")[2].split("&"))  # a '?' in it
        ):
            raise BackfillError(
                f"malformed database URL: the user or password holds an unencoded character{_ENCODING_HINT}",
                ExitCode.USAGE,
            )
        if backend == "mysql" and not url.database:
            raise BackfillError(
                "the MySQL URL names no database: add it, as in mysql://user@host:3306/mlflow", ExitCode.USAGE
            )
    driver = DRIVERS.get(backend)
    return url.set(drivername=f"{backend}+{driver}" if driver else backend)


def sqlite_path(url: URL) -> str | None:
    """The file a SQLite URL names (``sqlite:///x.db``, or a ``file:`` URI with ``?uri=true``); None in memory."""
    database = url.database or ""
    if not database or database == ":memory:":
        return None
    if str(url.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        rest = database[len("file:") :].split("?", 1)[0]
        if rest.startswith("//"):  # file://host/path: only an empty host or localhost is valid
            rest = "/" + rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
        return unquote(rest) or None
    return database


# What libpq takes from the environment for a part a postgresql:// URL leaves out (never PGPASSWORD).
LIBPQ_VARIABLES = (("host", "PGHOST"), ("port", "PGPORT"), ("database", "PGDATABASE"), ("username", "PGUSER"))


def display(url: URL) -> str:
    """The URL as it may be printed: no password, no query string (it may hold one, e.g. ``?password=``);
    a SQLite database as the plain path it names; on PostgreSQL, the parts libpq takes from ``$PGHOST``,
    ``$PGPORT``, ``$PGDATABASE`` and ``$PGUSER`` filled in and named (``postgresql://`` alone is valid)."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{sqlite_path(url) or ''}"
    filled: dict[str, str | int] = {}
    if url.get_backend_name() == "postgresql":
        for part, variable in LIBPQ_VARIABLES:
            value = os.environ.get(variable, "")
            if getattr(url, part) is None and value and (part != "port" or value.isdigit()):
                filled[part] = int(value) if part == "port" else value
    shown = url.set(query={}, **filled).render_as_string(hide_password=True)  # type: ignore[arg-type]
    shown += "?…" if url.query else ""
    names = dict(LIBPQ_VARIABLES)
    return shown + (f" ({', '.join('$' + names[part] for part in filled)} from the environment)" if filled else "")


def secrets(url: URL) -> tuple[str, ...]:
    """What must never be printed: the URL's password and any secret query parameter."""
    found = [url.password] if isinstance(url.password, str) and url.password else []
    for name in SECRET_PARAMETERS:
        value = url.query.get(name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str) and v:
                found.append(v)
    return tuple(found)
