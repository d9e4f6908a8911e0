"""TLS and mutual TLS against real servers on loopback, with certificates made per session.

A CA signs a server certificate (127.0.0.1 and localhost) and a client certificate
(CN=worker-1); a second CA signs a client certificate the server must refuse.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from prebake.client import Client, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from prebake.client.credentials import Credentials
from prebake.compiler.lease_poll import LeasePoller
from prebake.server.app import background_server
from prebake.server.auth.tokens import add_entry
from prebake.v1 import workers_pb2
from tests.auth_fixtures import make_token_file
from tests.conftest import INDUCTOR, INDUCTOR_KEY
from tests.processes import ServerProcess, wait_until

WORKER_SUBJECT = "CN=worker-1,O=prebake tests"


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: Pem
    client: Pem
    other_ca: Path
    stranger: Pem  # a client certificate signed by the other CA


def _name(common_name: str, org: str = "prebake tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        ]
    )


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Pem(path / "cert.pem", path / "key.pem")


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(root: Path, name: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    pem = _write(root / name, _certificate(subject, key, subject, key, ca=True), key)
    return subject, key, pem.cert


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    root = tmp_path_factory.mktemp("pki")
    ca_name, ca_key, ca_cert = _ca(root, "test-ca")
    other_name, other_key, other_cert = _ca(root, "other-ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        _name("prebake-server"),
        server_key,
        ca_name,
        ca_key,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        _name("worker-1"), client_key, ca_name, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate(
        _name("worker-1"), stranger_key, other_name, other_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    return Certificates(
        ca=ca_cert,
        server=_write(root / "server", server, server_key),
        client=_write(root / "client", client, client_key),
        other_ca=other_cert,
        stranger=_write(root / "stranger", stranger, stranger_key),
    )


def tls_settings(certs: Certificates, mutual: bool) -> dict[str, object]:
    settings: dict[str, object] = {"tls_cert": str(certs.server.cert), "tls_key": str(certs.server.key)}
    if mutual:
        settings["tls_client_ca"] = str(certs.ca)
    return settings


def test_tls_works_and_plaintext_is_refused(certs: Certificates, tmp_path: Path) -> None:
    with background_server(tmp_path / "data", **tls_settings(certs, mutual=False)) as server:
        with Client(server.address, ca_bundle=certs.ca) as secure:
            assert secure.get_stats().artifacts == 0
        with Client(server.address, retries=0) as plaintext, pytest.raises(Unavailable):
            plaintext.get_stats()
        # A server certificate no trusted CA signed is refused by the client.
        with (
            Client(server.address, retries=0, ca_bundle=certs.other_ca) as wrong_ca,
            pytest.raises(Unavailable),
        ):
            wrong_ca.get_stats()


@pytest.fixture
def mtls_server(certs: Certificates, tmp_path: Path) -> Iterator[str]:
    with background_server(tmp_path / "data", **tls_settings(certs, mutual=True)) as server:
        yield server.address


def test_mutual_tls_works(certs: Certificates, mtls_server: str) -> None:
    with Client(
        mtls_server, ca_bundle=certs.ca, client_cert=certs.client.cert, client_key=certs.client.key
    ) as c:
        assert c.get_stats().artifacts == 0


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mutual_tls_refuses_a_client_without_the_right_certificate(
    certs: Certificates, mtls_server: str, who: str
) -> None:
    identity = (
        {}
        if who == "no certificate"
        else {"client_cert": certs.stranger.cert, "client_key": certs.stranger.key}
    )
    with Client(mtls_server, retries=0, ca_bundle=certs.ca, **identity) as c, pytest.raises(Unavailable):  # type: ignore[arg-type]
        c.get_stats()


def test_a_worker_authenticated_by_its_certificate_can_lease(certs: Certificates, tmp_path: Path) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    add_entry(tokens.path, "worker-1", ["worker"], cert_subject=WORKER_SUBJECT)
    settings = tls_settings(certs, mutual=True)
    worker_credentials = Credentials.load(
        ca_bundle=certs.ca, client_cert=certs.client.cert, client_key=certs.client.key
    )
    with (
        background_server(tmp_path / "data", auth_file=str(tokens.path), **settings) as server,
        Client(
            server.address, credentials=dataclasses.replace(worker_credentials, token=tokens.tokens["admin"])
        ) as admin,
    ):
        job_id = admin.lookup(INDUCTOR_KEY).job.job_id
        poller = LeasePoller(server.address, 10.0, worker_credentials)
        try:
            leased = poller.lease(workers_pb2.LeaseJobRequest(worker_id="w1", capabilities=[INDUCTOR]))
        finally:
            poller.close()
        assert leased is not None and leased.job.job_id == job_id
        assert admin.get_job(job_id).worker == "w1"
        with (
            Client(server.address, credentials=worker_credentials, retries=0) as by_cert,
            pytest.raises(PermissionDenied, match="'worker-1'"),
        ):
            by_cert.delete_artifact("0" * 32)
        # A token, when sent, decides: a wrong one is not rescued by a known certificate.
        wrong = dataclasses.replace(worker_credentials, token="pbk_wrong")
        with Client(server.address, credentials=wrong, retries=0) as c, pytest.raises(Unauthenticated):
            c.list_workers()


def test_a_certificate_the_token_file_does_not_name_is_unauthenticated(
    certs: Certificates, tmp_path: Path
) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    with (
        background_server(
            tmp_path / "data", auth_file=str(tokens.path), **tls_settings(certs, mutual=True)
        ) as server,
        Client(
            server.address,
            retries=0,
            ca_bundle=certs.ca,
            client_cert=certs.client.cert,
            client_key=certs.client.key,
        ) as c,
        pytest.raises(Unauthenticated),
    ):
        c.get_stats()


def test_certificate_subjects_count_only_with_mutual_tls(certs: Certificates, tmp_path: Path) -> None:
    """Without a client CA the server verifies no certificate, so none may stand for an entry."""
    tokens = make_token_file(tmp_path / "tokens")
    add_entry(tokens.path, "worker-1", ["worker"], cert_subject=WORKER_SUBJECT)
    with (
        background_server(
            tmp_path / "data", auth_file=str(tokens.path), **tls_settings(certs, mutual=False)
        ) as server,
        Client(
            server.address,
            retries=0,
            ca_bundle=certs.ca,
            client_cert=certs.client.cert,
            client_key=certs.client.key,
        ) as c,
        pytest.raises(Unauthenticated),
    ):
        c.list_workers()


def test_unreadable_client_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"CA bundle .*missing\.pem"):
        Client("127.0.0.1:1", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(InvalidArgument, match="give both"):
        Client("127.0.0.1:1", client_cert=tmp_path / "c.pem")


@pytest.mark.slow
def test_serve_with_mutual_tls_and_auth_runs_its_embedded_workers(
    certs: Certificates, tmp_path: Path
) -> None:
    tokens = make_token_file(tmp_path / "tokens")
    args = [
        "--auth-file", str(tokens.path), "--workers", "1", "--data-dir", str(tmp_path / "d"),
        "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key),
        "--tls-client-ca", str(certs.ca),
    ]  # fmt: skip
    server = ServerProcess(tmp_path, "mtls", args)
    try:
        server.wait_ready()
        with Client(
            server.address,
            token=tokens.tokens["reader"],
            ca_bundle=certs.ca,
            client_cert=certs.client.cert,
            client_key=certs.client.key,
        ) as reader:
            wait_until(
                lambda: any("embedded" in w.worker_id for w in reader.list_workers()),
                60,
                "the embedded worker to lease over the server's private socket",
            )
    finally:
        assert server.stop() == 0, server.log()


def test_the_metrics_port_serves_https_with_the_same_certificates(
    certs: Certificates, tmp_path: Path
) -> None:
    import ssl
    import urllib.error
    import urllib.request

    with background_server(
        tmp_path / "data", metrics_listen="127.0.0.1:0", **tls_settings(certs, mutual=True)
    ) as srv:
        url = f"https://{srv.metrics_address}/metrics"
        trusted = ssl.create_default_context(cafile=str(certs.ca))
        trusted.load_cert_chain(str(certs.client.cert), str(certs.client.key))
        with urllib.request.urlopen(url, context=trusted, timeout=10) as response:
            assert response.status == 200
        without_certificate = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(url, context=without_certificate, timeout=10).read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{srv.metrics_address}/metrics", timeout=10).read()
