"""TLS the way MLflow reads it: MLFLOW_MYSQL_SSL_* on the MySQL family, libpq's sslmode and PGSSL* on PostgreSQL.

Servers whose users must use TLS:

* Oracle MySQL 9.7 (the session's server) makes its own CA and certificates when its data directory is
  made; the test copies ``ca.pem`` (and the client certificate it also makes) out of the container;
* MariaDB (10.11 makes none) and PostgreSQL get a CA, a server certificate for ``localhost`` /
  ``127.0.0.1`` and a client certificate generated here with ``cryptography``, in a container of their own
  (MariaDB: ``--ssl-*`` server options; PostgreSQL: an init script that turns ``ssl`` on and every
  ``host`` line of pg_hba.conf into ``hostssl``).

For each: the right CA works (the server's certificate is verified); a wrong CA, or a CA file that is not
there, is one line saying so, exit 3.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill.errors import ExitCode
from backfill.sql import SOURCE_TYPE_KEY
from tests import backends
from tests.conftest import Db, Server, alembic, run_cli
from tests.logins import Login, create_login

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DATABASE_", "MLFLOW_"))}


def _pem_key(key) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def make_certificates(directory: Path) -> None:
    """ca.pem, server.pem / server-key.pem (localhost, 127.0.0.1), client.pem / client-key.pem, all signed by
    the CA, and other-ca.pem, a CA that signed none of them. World-readable: test servers only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, san=None):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files: dict[str, bytes] = {}
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    files["ca.pem"] = certificate("mgb test CA", ca_key, "mgb test CA", ca_key, True).public_bytes(pem)
    files["other-ca.pem"] = certificate("another CA", other_key, "another CA", other_key, True).public_bytes(pem)
    for role, san in (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}.pem"] = certificate(f"mgb {role}", key, "mgb test CA", ca_key, False, san).public_bytes(pem)
        files[f"{role}-key.pem"] = _pem_key(key)
    for file, content in files.items():
        (directory / file).write_bytes(content)
        (directory / file).chmod(0o644)


def copy_out(container, path: str, target: Path) -> None:  # type: ignore[no-untyped-def]
    """One file out of a container (``docker cp``)."""
    stream, _ = container.get_wrapped_container().get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.getmembers()[0]
        extracted = tar.extractfile(member)
        assert extracted is not None
        target.write_bytes(extracted.read())
    target.chmod(0o644)


# PostgreSQL: certificates into the data directory (owned by the server's user, key 0600), ssl on, and
# password logins over TCP only with TLS. Sourced by the entrypoint before the final server starts.
PG_TLS_INIT = """\
cp /tls/server.pem "$PGDATA/server.crt"
cp /tls/server-key.pem "$PGDATA/server.key"
chown postgres:postgres "$PGDATA/server.crt" "$PGDATA/server.key" 2>/dev/null || true
chmod 600 "$PGDATA/server.key"
echo "ssl = on" >>"$PGDATA/postgresql.conf"
sed -i 's/^host /hostssl /' "$PGDATA/pg_hba.conf"
"""


@dataclass
class TlsDb:
    """An MLflow database on a server whose ``login`` must use TLS, and the certificate files."""

    db: Db
    login: Login
    certs: Path

    def url(self, query: str = "") -> str:
        """The login's URL, without password or parameters (the admin's ``?sslmode=require``), plus ``query``."""
        return self.login.url.set(query={}).render_as_string(hide_password=False) + query


@pytest.fixture(scope="module")
def tls_server(backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator:
    """(Server, certificate directory) of a server with TLS: the session's MySQL 9.7 (its own certificates),
    else a container of the backend's image started with certificates made here."""
    certs = tmp_path_factory.mktemp(f"tls-{backend}")
    make_certificates(certs)
    if backend == "mysql":
        server: Server = request.getfixturevalue("server")
        for name in ("ca.pem", "client-cert.pem", "client-key.pem"):
            copy_out(server.container, f"/var/lib/mysql/{name}", certs / name.replace("-cert", ""))
        yield server, certs
        return
    image = backends.image_for(backend)
    container = backends._container(backend, image, "tls-root-pw-0")
    if backends.server_backend(backend).family == "postgresql":
        init = tmp_path_factory.mktemp(f"tls-init-{backend}")
        init.chmod(0o755)
        (init / "tls.sh").write_text(PG_TLS_INIT)
        container.with_volume_mapping(str(init), "/docker-entrypoint-initdb.d", "ro")
    else:
        options = [*backends.SNAPSHOT_ISOLATION_OFF.get(backend, ())]
        options += ["--ssl-ca=/tls/ca.pem", "--ssl-cert=/tls/server.pem", "--ssl-key=/tls/server-key.pem"]
        container.with_command(" ".join(options))
    container.with_volume_mapping(str(certs), "/tls", "ro")
    backends._start(container)
    url = sa.make_url(container.get_connection_url())
    if backends.server_backend(backend).family == "postgresql":
        url = url.set(drivername="postgresql+psycopg", database="postgres", query={"sslmode": "require"})
    server = Server(backend, certs, admin_url=url.render_as_string(hide_password=False), container=container)
    try:
        yield server, certs
    finally:
        server.stop_copies()
        container.stop()


@pytest.fixture
def tls_db(tls_server: tuple[Server, Path], backend: str) -> Iterator[TlsDb]:
    server, certs = tls_server
    url = server.new_mlflow_database()
    engine = sa.create_engine(url)
    db = Db(backend, url, server, engine)
    db.add_experiments([(1001, "active", [(SOURCE_TYPE_KEY, "GATEWAY")])])
    login = create_login(db, tls="REQUIRE SSL")
    yield TlsDb(db, login, certs)
    engine.dispose()


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run_cli(*args, env={**CLEAN, **(env or {})})
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    return result.returncode, output


def one_line_error(output: str) -> bool:
    return output.startswith("Error: ") and output.count("\n") == 1


@pytest.mark.backends("mysql")
def test_mysql_tls_as_mlflow_reads_it(tls_db: TlsDb) -> None:
    """A user that must use TLS (REQUIRE SSL): MLFLOW_MYSQL_SSL_CA with the server's CA works, for the CLI and
    Alembic; a CA that did not sign the server's certificate, and a CA file that is not there, are refused
    with one line naming the problem and the variable, exit 3."""
    certs = tls_db.certs
    secret = tls_db.certs.parent / f"{tls_db.login.user}-password"
    secret.write_text(tls_db.login.password)
    base = {"DATABASE_URL": tls_db.url(), "DATABASE_PASSWORD_FILE": str(secret)}

    code, out = cli("run", env={**base, "MLFLOW_MYSQL_SSL_CA": str(certs / "ca.pem")})
    assert code == 0, out
    assert "inserted 1 isGateway tags" in out
    upgrade = alembic(None, "upgrade", "head", env={**CLEAN, **base, "MLFLOW_MYSQL_SSL_CA": str(certs / "ca.pem")})
    assert upgrade.returncode == 0, upgrade.stderr

    code, out = cli("status", env={**base, "MLFLOW_MYSQL_SSL_CA": str(certs / "other-ca.pem")})
    assert code == ExitCode.CONNECT, out
    assert one_line_error(out), out
    assert "TLS: the server's certificate failed verification with the CA" in out
    assert "($MLFLOW_MYSQL_SSL_CA)" in out and "other-ca.pem" in out

    code, out = cli("status", env={**base, "MLFLOW_MYSQL_SSL_CA": str(certs / "no-such-ca.pem")})
    assert code == ExitCode.CONNECT, out
    assert one_line_error(out), out
    assert "TLS: cannot read" in out and "no-such-ca.pem" in out and "$MLFLOW_MYSQL_SSL_CA" in out
    assert tls_db.login.password not in out


@pytest.mark.backends("mysql")
def test_mysql_client_certificate(tls_db: TlsDb) -> None:
    """A user that must show a certificate signed by the CA (REQUIRE X509): MLFLOW_MYSQL_SSL_CERT and
    MLFLOW_MYSQL_SSL_KEY present it; without them the login is refused (exit 3)."""
    from tests.logins import _admin

    login = tls_db.login
    _admin(tls_db.db, f"ALTER USER '{login.user}'@'%' REQUIRE X509")
    certs = tls_db.certs
    secret = certs.parent / f"{login.user}-x509-password"
    secret.write_text(login.password)
    base = {
        "DATABASE_URL": tls_db.url(),
        "DATABASE_PASSWORD_FILE": str(secret),
        "MLFLOW_MYSQL_SSL_CA": str(certs / "ca.pem"),
    }
    code, out = cli("verify", env=base)
    assert code == ExitCode.CONNECT, out
    assert one_line_error(out), out
    with_cert = {
        **base,
        "MLFLOW_MYSQL_SSL_CERT": str(certs / "client.pem"),
        "MLFLOW_MYSQL_SSL_KEY": str(certs / "client-key.pem"),
    }
    code, out = cli("verify", env=with_cert)
    assert code == 1, out  # logged in: one gateway experiment lacks the tag


@pytest.mark.backends("mysql")
def test_mysql_host_name_check_is_opt_in(tls_db: TlsDb, backend: str) -> None:
    """With the CA alone the certificate's chain is verified (MySQL's VERIFY_CA); ``?ssl_check_hostname=true``
    also checks the host name (VERIFY_IDENTITY): MySQL's generated certificate names no host and fails it,
    the certificate made here for localhost passes."""
    secret = tls_db.certs.parent / f"{tls_db.login.user}-host-password"
    secret.write_text(tls_db.login.password)
    env = {"DATABASE_PASSWORD_FILE": str(secret), "MLFLOW_MYSQL_SSL_CA": str(tls_db.certs / "ca.pem")}
    code, out = cli("verify", "--database-url", tls_db.url("?ssl_check_hostname=true"), env=env)
    if backend == "mysql":
        assert code == ExitCode.CONNECT, out
        assert "failed verification" in out and "mismatch" in out.lower()
    else:
        assert code == 1, out


@pytest.mark.backends("postgresql")
def test_postgresql_tls_with_libpq_settings(tls_db: TlsDb) -> None:
    """A server that takes password logins only over TLS (hostssl): PGSSLMODE=verify-full with PGSSLROOTCERT,
    or the same as URL parameters, works; a wrong CA, a root certificate file that is not there, and
    sslmode=disable are one line each, exit 3."""
    certs, login = tls_db.certs, tls_db.login
    env = {"PGPASSWORD": login.password, "DATABASE_URL": tls_db.url()}
    verified = {**env, "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(certs / "ca.pem")}
    code, out = cli("run", env=verified)
    assert code == 0, out
    code, out = cli(
        "verify",
        "--database-url",
        tls_db.url(f"?sslmode=verify-full&sslrootcert={certs / 'ca.pem'}"),
        env={"PGPASSWORD": login.password},
    )
    assert code == 0, out
    upgrade = alembic(None, "upgrade", "head", env={**CLEAN, **verified})
    assert upgrade.returncode == 0, upgrade.stderr

    for changed, says in (
        ({"PGSSLROOTCERT": str(certs / "other-ca.pem")}, "certificate verify failed"),
        ({"PGSSLROOTCERT": str(certs / "no-such-ca.pem")}, "no-such-ca.pem"),
        ({"PGSSLMODE": "disable"}, "no encryption"),
    ):
        code, out = cli("status", env={**verified, **changed})
        assert code == ExitCode.CONNECT, out
        assert one_line_error(out), out
        assert says in out
        assert login.password not in out
