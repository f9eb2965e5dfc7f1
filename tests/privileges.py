"""Database users with exactly the grants docs/privileges.md documents (its ```sql <dialect> <role>``` blocks)."""

from __future__ import annotations

import re
import uuid

import sqlalchemy as sa

from tests.conftest import REPO, Db


def documented_grants(dialect: str, role: str) -> list[str]:
    """The GRANT statements of docs/privileges.md's ```sql <dialect> <role>``` block."""
    text = (REPO / "docs" / "privileges.md").read_text()
    blocks = re.findall(rf"```sql {dialect} {role}\n(.*?)```", text, re.S)
    assert len(blocks) == 1, (dialect, role)
    return [line.strip().rstrip(";") for line in blocks[0].splitlines() if line.strip()]


def documented_user(db: Db, role: str, admin_creates_tables: bool) -> str:
    """A new user with exactly docs/privileges.md's grants for ``role``; returns its URL."""
    name, password = f"w_{uuid.uuid4().hex[:8]}", "pw-" + uuid.uuid4().hex[:8]
    database = sa.make_url(db.url).database or ""
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if admin_creates_tables:  # as `alembic upgrade head` or one `run` by the admin would
            from backfill.schema import metadata

            metadata.create_all(conn)
        if db.dialect == "postgresql":
            conn.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            user = name
        else:
            conn.execute(sa.text(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"))
            user = f"'{name}'@'%'"
        for grant in documented_grants(db.dialect, role):
            conn.execute(sa.text(grant.replace("<user>", user).replace("<database>", database)))
    admin.dispose()
    return sa.make_url(db.url).set(username=name, password=password).render_as_string(hide_password=False)
