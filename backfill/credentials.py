"""Where the password and TLS settings come from: a password file, a password command, MLflow's MySQL TLS variables.

**A password source** replaces the URL's password on every new connection the tool makes (read replicas'
too), fetched again each time, so a rotated secret file or a short-lived IAM token (15 minutes on RDS)
serves a run of any length:

* a file: ``--password-file PATH``, ``-x password-file=PATH`` (Alembic) or ``$DATABASE_PASSWORD_FILE``;
  its trailing CR and LF characters are removed (secret files often end in a newline), nothing else;
* a command: ``--password-command CMD``, ``-x password-command=CMD`` or ``$DATABASE_PASSWORD_COMMAND``; the
  line is split as a POSIX shell would split it (quotes, backslashes) and run without a shell, with no
  input, within the connect timeout; its standard output, surrounding whitespace removed, is the
  password; its standard error is passed through.

An option counts before its environment variable; a file and a command together are refused (exit 2), and
so is a password source with SQLite (a file database has no password). A password source given explicitly
wins over the URL's password, and on PostgreSQL over libpq's ``$PGPASSWORD`` and ``.pgpass``. Every
password obtained this way joins the secrets no error message may contain (:func:`errors.withhold`).

Exit codes: a password file that cannot be read, is empty or is not UTF-8, and a command that cannot be
parsed or started, are the user's configuration (2: a retry cannot help); a command that fails, times out
or prints nothing is like a login refused (3: the token service may answer the next try).

**TLS.** On the MySQL family, ``$MLFLOW_MYSQL_SSL_CA``, ``$MLFLOW_MYSQL_SSL_CERT`` and ``$MLFLOW_MYSQL_SSL_KEY``
are read as MLflow reads them (``mlflow/store/db/utils.py`` hands them to PyMySQL as ``ssl_ca``, ``ssl_cert``,
``ssl_key``): any of them makes TLS required. Unlike PyMySQL with those arguments, which encrypts without
checking the server's certificate at all, a CA given here is used to verify it (MySQL's ``VERIFY_CA``;
``?ssl_check_hostname=true`` in the URL adds the host name, ``VERIFY_IDENTITY``). A CA file that cannot be
read and a certificate that fails verification are one line and exit 3, as libpq's are on PostgreSQL.
PostgreSQL needs nothing here: libpq itself reads ``PGHOST``, ``PGPORT``, ``PGDATABASE``, ``PGUSER``,
``PGPASSWORD``, ``PGPASSFILE``, ``PGSSLMODE``, ``PGSSLROOTCERT``, ``PGSSLCERT``, ``PGSSLKEY`` for what the
URL leaves out.
"""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from backfill.errors import BackfillError, ExitCode, withhold
from backfill.urls import display

FILE_VARIABLE = "DATABASE_PASSWORD_FILE"
COMMAND_VARIABLE = "DATABASE_PASSWORD_COMMAND"
MYSQL_TLS_VARIABLES = ("MLFLOW_MYSQL_SSL_CA", "MLFLOW_MYSQL_SSL_CERT", "MLFLOW_MYSQL_SSL_KEY")
_MAX_FILE = 64 * 1024  # more than any password; stops a wrong path (a log, /dev/zero) from being read whole

# What the CLI's options or Alembic's -x arguments gave for this command (see configure()).
_given: dict[str, str | None] = {"file": None, "command": None}
_via = "--password-"


def configure(file: str | None, command: str | None, via: str = "--password-") -> None:
    """Record the password file and command given on the command line (``via`` names the option in
    messages: ``--password-`` or ``-x password-``); None leaves it to the environment variable."""
    global _via
    _given.update(file=file or None, command=command or None)
    _via = via


def reset() -> None:
    """Forget what :func:`configure` recorded (at the end of a command)."""
    configure(None, None)


@dataclass(frozen=True)
class PasswordSource:
    """A password file or a password command, and where it was given (an option or a variable)."""

    kind: str  # "file" or "command"
    value: str  # the path, or the command line
    origin: str  # "--password-file", "-x password-command", "$DATABASE_PASSWORD_FILE", ...

    def obtain(self, timeout: float) -> str:
        """The password, read or run now; never printed, and withheld from every later error message."""
        password = self._read() if self.kind == "file" else self._run(timeout)
        withhold(password)
        return password

    def _read(self) -> str:
        where = f"the password file {self.value!r} ({self.origin})"
        try:
            with open(self.value, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except OSError as exc:
            raise BackfillError(f"cannot read {where}: {exc.strerror or exc}", ExitCode.USAGE) from None
        if len(raw) > _MAX_FILE:
            raise BackfillError(f"{where} is larger than {_MAX_FILE} bytes: not a password", ExitCode.USAGE)
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise BackfillError(f"{where} is not UTF-8 text", ExitCode.USAGE) from None
        if not password:
            raise BackfillError(f"{where} is empty", ExitCode.USAGE)
        return password

    def _run(self, timeout: float) -> str:
        try:
            argv = shlex.split(self.value)
        except ValueError as exc:
            message = f"the password command ({self.origin}) cannot be parsed: {exc}"
            raise BackfillError(message, ExitCode.USAGE) from None
        if not argv:
            raise BackfillError(f"the password command ({self.origin}) is empty", ExitCode.USAGE)
        # Only the program is ever named: the arguments may hold a secret of their own.
        what = f"the password command {argv[0]!r} ({self.origin})"
        try:
            # Its own session: a timeout ends everything it started, not only the first process.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise BackfillError(f"{what} cannot be started: {exc.strerror or exc}", ExitCode.USAGE) from None
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackfillError(
                f"{what} did not finish within {timeout:g} s (the connect timeout); its output is not shown",
                ExitCode.CONNECT,
            ) from None
        finally:
            if proc.poll() is None:  # a timeout or a signal: end the whole group, then reap it
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if proc.returncode != 0:
            status = f"exit status {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
            raise BackfillError(f"{what} failed ({status}); its output is not shown", ExitCode.CONNECT)
        password = out.decode("utf-8", errors="replace").strip()
        if not password:
            raise BackfillError(f"{what} printed no password", ExitCode.CONNECT)
        return password


def password_source() -> PasswordSource | None:
    """The password source of this command: an option, else its environment variable; both kinds at once
    are refused with exit 2."""
    found = []
    for kind, variable in (("file", FILE_VARIABLE), ("command", COMMAND_VARIABLE)):
        given, from_env = _given[kind], os.environ.get(variable, "").strip()
        if given:
            found.append(PasswordSource(kind, given, f"{_via}{kind}"))
        elif from_env:
            found.append(PasswordSource(kind, from_env, f"${variable}"))
    if len(found) == 2:
        raise BackfillError(
            f"both a password file ({found[0].origin}) and a password command ({found[1].origin}) are given: "
            "use one of them",
            ExitCode.USAGE,
        )
    return found[0] if found else None


@dataclass(frozen=True)
class MysqlTls:
    """MLflow's MySQL TLS variables, as set in the environment."""

    ca: str | None
    cert: str | None
    key: str | None

    @classmethod
    def from_environment(cls) -> MysqlTls | None:
        ca, cert, key = (os.environ.get(v, "").strip() or None for v in MYSQL_TLS_VARIABLES)
        return cls(ca, cert, key) if ca or cert or key else None

    def context(self, check_hostname: bool) -> ssl.SSLContext:
        """A client context: the server's certificate verified with the CA when one is given (else, as
        MLflow and PyMySQL do, encryption without verification), and the client certificate if any."""
        ca_variable, cert_variable, _ = MYSQL_TLS_VARIABLES
        try:
            context = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            message = _file_problem(self.ca, ca_variable, exc, "PEM CA certificate")
            raise BackfillError(message, ExitCode.CONNECT) from None
        # MySQL's own generated certificates are not strict X.509 (Python 3.13 checks that by default).
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        context.check_hostname = bool(self.ca) and check_hostname
        if not self.ca:
            context.verify_mode = ssl.CERT_NONE
        if self.cert or self.key:
            try:
                context.load_cert_chain(self.cert or self.key or "", keyfile=self.key)
            except (OSError, ssl.SSLError) as exc:
                variable = f"${cert_variable} / ${MYSQL_TLS_VARIABLES[2]}"
                raise BackfillError(
                    _file_problem(self.cert or self.key, variable, exc, "PEM certificate and key"), ExitCode.CONNECT
                ) from None
        return context


def _file_problem(path: str | None, variable: str, exc: BaseException, expected: str) -> str:
    variable = variable if variable.startswith("$") else f"${variable}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {path!r} ({variable}) holds no usable {expected} ({exc.reason or exc})"
    return f"TLS: cannot read {path!r} ({variable}): {getattr(exc, 'strerror', None) or exc}"


def install(engine: Engine, connect_timeout: float) -> None:
    """Apply the password source and MLflow's MySQL TLS variables to every new connection of ``engine``."""
    source = password_source()
    backend = engine.dialect.name
    if source is not None and backend == "sqlite":
        raise BackfillError(
            f"a password source ({source.origin}) has no use with SQLite, whose database is a file: remove it",
            ExitCode.USAGE,
        )
    tls = MysqlTls.from_environment() if backend == "mysql" else None
    if source is None and tls is None:
        return
    where = display(engine.url)

    def connect(dialect: Any, _record: Any, cargs: tuple, cparams: dict[str, Any]) -> Any:
        if source is not None:
            cparams.pop("passwd", None)  # the MySQL dialects' older name for it
            cparams["password"] = source.obtain(connect_timeout)
        if tls is None:
            return None  # SQLAlchemy connects with the parameters as changed
        url_ssl = cparams.get("ssl") if isinstance(cparams.get("ssl"), dict) else {}
        cparams["ssl"] = tls.context(check_hostname=bool(url_ssl.get("check_hostname", False)))
        try:
            return dialect.loaded_dbapi.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            raise _tls_failure(exc, tls, where) or exc from None

    event.listen(engine, "do_connect", connect)


def _tls_failure(exc: BaseException, tls: MysqlTls, where: str) -> BackfillError | None:
    """PyMySQL's "Can't connect" wrapping a TLS failure, as one line that says which (exit 3, not retried)."""
    original = getattr(exc, "original_exception", None)
    if isinstance(original, ssl.SSLCertVerificationError):
        return BackfillError(
            f"cannot connect to {where}: TLS: the server's certificate failed verification with the CA "
            f"{tls.ca!r} (${MYSQL_TLS_VARIABLES[0]}): {original.verify_message or original.reason}",
            ExitCode.CONNECT,
        )
    if isinstance(original, ssl.SSLError):
        return BackfillError(
            f"cannot connect to {where}: TLS handshake failed: {original.reason or original}", ExitCode.CONNECT
        )
    return None
