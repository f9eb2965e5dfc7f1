"""Database logins made for a test: a user of its own on the test's database, whose password can change.

The password holds ``@``, ``/``, ``:`` and ``%`` on purpose: a password handed over as a file, a command's
output or a libpq variable is never part of a URL, so it needs no percent-encoding.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from tests.conftest import Db


def new_password() -> str:
    return f"p@ss/w:rd%{secrets.token_hex(6)}"


@dataclass
class Login:
    """A login on the test database: its name, its current password, and the database's URL for it."""

    db: Db
    user: str
    password: str

    @property
    def url(self) -> sa.URL:
        """The database URL with this user and no password."""
        return sa.make_url(self.db.url).set(username=self.user)._replace(password=None)  # set() ignores None

    def url_with(self, password: str | None) -> str:
        return self.url._replace(password=password).render_as_string(hide_password=False)

    @property
    def host(self) -> str:
        return self.url.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.url.port or 0)

    @property
    def database(self) -> str:
        return self.url.database or ""

    def set_password(self, password: str) -> None:
        """Change the login's password on the server (as a secret rotation would)."""
        quoted = password.replace("'", "''")
        if self.db.dialect == "postgresql":
            _admin(self.db, f"ALTER ROLE \"{self.user}\" PASSWORD '{quoted}'")
        else:
            _admin(self.db, f"ALTER USER '{self.user}'@'%' IDENTIFIED BY '{quoted}'")
        self.password = password


def _admin(db: Db, *statements: str) -> None:
    admin = sa.make_url(db.server.admin_url or "")
    if db.dialect == "postgresql":  # per database: the grants on its schema and tables
        admin = admin.set(database=sa.make_url(db.url).database)
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # no parameters: '%' and ':' stay literal
            for statement in statements:
                cursor.execute(statement)
            cursor.close()
    finally:
        engine.dispose()


def create_login(db: Db, tls: str = "") -> Login:
    """A new user with every privilege on the test's database (MySQL family: ``tls`` adds a REQUIRE clause,
    e.g. ``REQUIRE SSL``)."""
    user, password = f"u_{secrets.token_hex(5)}", new_password()
    database = sa.make_url(db.url).database
    if db.dialect == "postgresql":
        _admin(
            db,
            f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'",
            f'GRANT ALL PRIVILEGES ON DATABASE "{database}" TO "{user}"',
            f'GRANT ALL PRIVILEGES ON SCHEMA public TO "{user}"',
            f'GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA public TO "{user}"',
            f'GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public TO "{user}"',
        )
    else:
        _admin(
            db,
            f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}' {tls}",
            f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'%'",
        )
    return Login(db, user, password)
