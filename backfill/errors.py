"""Exit codes, and how a failure reads to a person: one line, the right code, never a password.

Every error a command can meet ends here. Driver errors are classified by their codes (SQLSTATE on
PostgreSQL, the error number on the MySQL family), never by guessing from a message that may be
translated; the driver's own text is appended only when it cannot contain a secret.

This module imports nothing else of the package: how a failure reads does not depend on the retry policy
or on how URLs are parsed (the callers hand in the URL as it may be printed and the secrets to withhold).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from sqlalchemy.exc import DBAPIError


class ExitCode(IntEnum):
    """Exit codes of every command, the CLI's and Alembic's alike (also listed in the README)."""

    OK = 0
    MISSING = 1  # verify: gateway experiments still lack isGateway
    USAGE = 2  # bad option or malformed / unsupported database URL, or a pooler mode the tool cannot use
    CONNECT = 3  # cannot reach or log in to the database, or it stopped answering
    NOT_MLFLOW = 4  # not an MLflow database, or not the schema this tool knows
    PERMISSION = 5  # the database user lacks a privilege the command needs
    LOCKED = 6  # another run or revert holds the single-runner lock
    STOPPED = 7  # stopped early (signal, timeouts, retries used up, database error); nothing half-written


class BackfillError(Exception):
    """An error with a one-line message for people and the exit code to leave with."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code


# PostgreSQL SQLSTATEs and MySQL-family error numbers, by what they mean to the user.
_PG_CONNECT = {"28P01": "password authentication failed", "28000": "login refused", "3D000": "no such database"}
_PG_PERMISSION = {"42501"}
_MY_CONNECT = {
    1044: "access to the database denied",
    1045: "login refused (user or password)",
    1049: "no such database",
    1251: "the server wants an authentication method the driver does not offer",
}
_MY_PERMISSION = {1142, 1143, 1227, 1370, 1290, 1036}  # table / column / routine denied, read-only server or table
_SQLITE_PERMISSION = ("readonly database", "attempt to write a readonly")
_LOST = (
    "server closed the connection",
    "connection refused",
    "could not connect",
    "can't connect",
    "lost connection",
    "timeout expired",
    "connection timed out",
    "consuming input failed",
    "the database system is",
    "connection is closed",
    "connection already closed",
    "bad file descriptor",
)
# PgBouncer in statement pooling mode refuses every transaction block (SQLSTATE 08P01, which would otherwise
# read as a lost connection and be retried in vain).
STATEMENT_POOLING = "transaction blocks not allowed in statement pooling mode"

# Set on a driver exception raised because the watchdog (retry.py) cut its connection: the deadline in seconds.
_CUT = "_mgb_cut_after"


# Passwords obtained outside the URL (a password file or command: backfill/credentials.py).
_withheld: set[str] = set()


def withhold(secret: str) -> None:
    """Treat ``secret`` like the URL's password: no message that contains it is shown."""
    if secret:
        _withheld.add(secret)


def mark_cut(exc: BaseException, seconds: float) -> None:
    """Record on ``exc`` that the watchdog cut its connection after ``seconds``."""
    setattr(exc, _CUT, seconds)


def cut_by_watchdog(exc: BaseException) -> float | None:
    """The deadline (seconds) after which the watchdog cut the connection that raised ``exc``, or None."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__, exc.__context__):
        seconds = getattr(candidate, _CUT, None)
        if seconds is not None:
            return float(seconds)
    return None


def driver_text(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """The driver's message on one line, or a note that it is withheld because it contains a secret (one of
    ``secrets``, or a password from a file or command)."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    if any(s and s in text for s in (*secrets, *_withheld)):
        return "(the driver's message is withheld: it contains the password)"
    return text[:300]


def mysql_errno(exc: BaseException) -> int | None:
    """The MySQL-family error number of a driver error, or None."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error, or None."""
    return getattr(getattr(exc, "orig", None) or exc, "sqlstate", None)


def statement_pooling(where: str) -> BackfillError:
    return BackfillError(
        f"{where} is a connection pooler in statement pooling mode, which allows no transaction: this tool "
        "commits each batch as a transaction of several statements. Point the URL at a pool in transaction or "
        "session mode (PgBouncer: pool_mode = transaction), or at the server itself; nothing was written",
        ExitCode.USAGE,
    )


def describe(
    exc: BaseException, where: str, secrets: Iterable[str | None] = (), connecting: bool = False
) -> BackfillError:
    """One line and an exit code for any failure of a database operation on ``where`` (the URL as it may be
    printed); the driver's text is withheld if it contains one of ``secrets``."""
    if isinstance(exc, BackfillError):
        return exc
    cut = cut_by_watchdog(exc)
    if cut:
        return BackfillError(
            f"cannot connect to {where}: the server did not answer within {cut:g} s "
            "(frozen, overloaded or unreachable)",
            ExitCode.CONNECT,
        )
    detail = driver_text(exc, secrets)
    lowered = detail.lower()
    if STATEMENT_POOLING in lowered:
        return statement_pooling(where)
    if "timeout expired" in lowered or "timed out" in lowered:
        return BackfillError(
            f"cannot connect to {where}: the server did not answer in time (frozen, overloaded or unreachable): "
            f"{detail}",
            ExitCode.CONNECT,
        )
    state, errno = sqlstate(exc), mysql_errno(exc)
    if "file is not a database" in lowered or "unable to open database file" in lowered:
        return BackfillError(f"{where} is not an MLflow tracking database: {detail}", ExitCode.NOT_MLFLOW)
    if state in _PG_CONNECT or errno in _MY_CONNECT:
        reason = _PG_CONNECT.get(state or "") or _MY_CONNECT.get(errno or 0)
        return BackfillError(f"cannot connect to {where}: {reason}: {detail}", ExitCode.CONNECT)
    if state in _PG_PERMISSION or errno in _MY_PERMISSION or any(p in lowered for p in _SQLITE_PERMISSION):
        return BackfillError(f"permission denied on {where}: {detail}", ExitCode.PERMISSION)
    lost = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if connecting or lost or (state or "").startswith("08") or errno in (2003, 2005, 2006, 2013):
        return BackfillError(f"cannot connect to {where}: {detail}", ExitCode.CONNECT)
    if not isinstance(exc, DBAPIError) and not hasattr(exc, "orig"):
        if any(p in lowered for p in _LOST):
            return BackfillError(f"cannot connect to {where}: {detail}", ExitCode.CONNECT)
    return BackfillError(f"database error on {where}: {detail}", ExitCode.STOPPED)
