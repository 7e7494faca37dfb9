"""Certificates: real files in a temporary folder, checked with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker import certs
from jobworker.cli import main
from jobworker.errors import JobWorkerError

SIX = ("ca.pem", "ca/ca-key.pem", "server.pem", "server-key.pem", "admin.pem", "admin-key.pem")
FILES = sorted((*SIX, "crl.pem"))  # and ca/issued/, a copy of each certificate issued


def tree(directory: Path) -> list[str]:
    """The files below `directory` (but ca/issued/), as paths relative to it."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.parent.name != "issued"
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def pki(tmp_path: Path) -> certs.PkiPaths:
    return certs.init_pki(tmp_path / "certs", hosts=["jobs.example.com", "10.1.2.3"])


def test_init_writes_six_files_with_safe_modes(pki: certs.PkiPaths) -> None:
    assert tree(pki.directory) == FILES
    assert mode(pki.directory) == 0o700
    assert mode(pki.ca_key.parent) == 0o700  # the CA key apart from what the server reads
    for key in (pki.ca_key, pki.server_key, pki.admin_key):
        assert mode(key) == 0o600
    for cert in (pki.ca_cert, pki.server_cert, pki.admin_cert):
        assert mode(cert) == 0o644


def test_ca_is_a_p256_ca(pki: certs.PkiPaths) -> None:
    ca = load(pki.ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3649)


def test_server_certificate_names_and_usage(pki: certs.PkiPaths) -> None:
    server = load(pki.server_cert)
    assert certs.common_name(pki.server_cert.read_bytes()) == "jobworker server"
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert {"localhost", socket.gethostname(), "jobs.example.com"} <= set(dns)
    assert {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    } <= set(ips)
    assert "10.1.2.3" not in dns
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def test_leaves_verify_against_the_ca(pki: certs.PkiPaths) -> None:
    ca = load(pki.ca_cert)
    load(pki.server_cert).verify_directly_issued_by(ca)
    load(pki.admin_cert).verify_directly_issued_by(ca)


def test_admin_is_a_client_certificate(pki: certs.PkiPaths) -> None:
    admin = load(pki.admin_cert)
    assert certs.common_name(pki.admin_cert.read_bytes()) == "admin"
    assert eku(admin) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_second_init_refuses_and_keeps_the_ca(pki: certs.PkiPaths) -> None:
    before = {name: (pki.directory / name).read_bytes() for name in SIX}
    with pytest.raises(certs.CertsExist, match=r"a CA already exists in .*ca\.pem") as info:
        certs.init_pki(pki.directory)
    assert isinstance(info.value, JobWorkerError)
    assert {name: (pki.directory / name).read_bytes() for name in SIX} == before
    assert tree(pki.directory) == FILES


def test_init_refuses_when_only_the_ca_key_exists(tmp_path: Path) -> None:
    (tmp_path / "ca-key.pem").write_bytes(b"keep me")
    with pytest.raises(certs.CertsExist, match=r"ca-key\.pem"):
        certs.init_pki(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ca-key.pem"]
    assert (tmp_path / "ca-key.pem").read_bytes() == b"keep me"


def test_init_with_a_bad_host_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(certs.InvalidCertName):
        certs.init_pki(tmp_path / "certs", hosts=["bad\u00e9.example"])
    assert not (tmp_path / "certs").exists()


def test_issue_client(pki: certs.PkiPaths) -> None:
    cert_path, key_path = certs.issue_client(pki.directory, "alice@example.com", days=30)
    assert cert_path == pki.directory / "alice@example.com.pem"
    assert key_path == pki.directory / "alice@example.com-key.pem"
    assert mode(key_path) == 0o600
    cert = load(cert_path)
    assert certs.common_name(cert_path.read_bytes()) == "alice@example.com"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(load(pki.ca_cert))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime < dt.timedelta(days=31)


def test_issue_client_refuses_duplicates(pki: certs.PkiPaths) -> None:
    certs.issue_client(pki.directory, "bob")
    before = (pki.directory / "bob.pem").read_bytes()
    with pytest.raises(certs.CertsExist, match="bob"):
        certs.issue_client(pki.directory, "bob")
    with pytest.raises(certs.CertsExist, match="admin"):
        certs.issue_client(pki.directory, "admin")
    assert (pki.directory / "bob.pem").read_bytes() == before


@pytest.mark.parametrize(
    "name", ["", "ca", "server", "CA", "ca-key", "x" * 65, "a/b", "../up", "sp ace", "-flag"]
)
def test_issue_client_rejects_bad_names(pki: certs.PkiPaths, name: str) -> None:
    with pytest.raises(certs.InvalidCertName):
        certs.issue_client(pki.directory, name)
    assert tree(pki.directory) == FILES


def test_issue_client_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(certs.CaMissing, match="certs init"):
        certs.issue_client(tmp_path, "bob")
    assert list(tmp_path.iterdir()) == []


def test_issue_server_replaces_only_the_server_pair(pki: certs.PkiPaths) -> None:
    old_server = pki.server_cert.read_bytes()
    others = {p: p.read_bytes() for p in (pki.ca_cert, pki.ca_key, pki.admin_cert)}
    certs.issue_server(pki.directory, hosts=["new.example.com"])
    assert pki.server_cert.read_bytes() != old_server
    assert {p: p.read_bytes() for p in others} == others
    assert mode(pki.server_key) == 0o600
    assert "DNS:new.example.com" in certs.describe(pki.server_cert)["sans"]
    load(pki.server_cert).verify_directly_issued_by(load(pki.ca_cert))
    certs.read_pair(pki.server_cert, pki.server_key)  # the new key matches the new cert
    assert tree(pki.directory) == FILES


def test_read_pair_rejects_a_mismatch(pki: certs.PkiPaths) -> None:
    with pytest.raises(certs.CertsError, match="does not match"):
        certs.read_pair(pki.server_cert, pki.admin_key)


def test_sign_certificate_makes_expired_and_foreign_certificates(tmp_path: Path) -> None:
    foreign_ca, foreign_key = certs.new_ca("someone else")
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert, key = certs.sign_certificate(
        foreign_ca,
        foreign_key,
        "mallory",
        server=False,
        not_before=past,
        not_after=past + dt.timedelta(days=1),
    )
    certs.write_pair(cert, key, tmp_path / "m.pem", tmp_path / "m-key.pem")
    info = certs.describe(tmp_path / "m.pem")
    assert info["expired"]
    assert info["common_name"] == "mallory"
    assert info["issuer"] == "CN=someone else"
    assert mode(tmp_path / "m-key.pem") == 0o600
    with pytest.raises(certs.CertsExist):
        certs.write_pair(cert, key, tmp_path / "m.pem", tmp_path / "m-key.pem")


def test_describe(pki: certs.PkiPaths) -> None:
    info = certs.describe(pki.server_cert)
    assert info["subject"] == "CN=jobworker server"
    assert info["issuer"] == "CN=jobworker CA"
    assert not info["expired"]
    assert "IP:::1" in info["sans"]
    assert dt.datetime.fromisoformat(info["not_after"]) > dt.datetime.now(dt.UTC)
    assert certs.describe(pki.ca_cert)["is_ca"]


# --- the command line -------------------------------------------------------------------


def test_cli_init_issue_show(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "certs"
    result = runner.invoke(
        main, ["certs", "init", "--dir", str(directory), "--host", "jobs.example.com"]
    )
    assert result.exit_code == 0, result.output
    for name in (*SIX, "crl.pem"):
        assert str(directory / name) in result.output
        assert (directory / name).is_file()

    result = runner.invoke(main, ["certs", "issue", "bob", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert str(directory / "bob.pem") in result.output
    assert certs.common_name((directory / "bob.pem").read_bytes()) == "bob"
    assert mode(directory / "bob-key.pem") == 0o600

    result = runner.invoke(main, ["certs", "show", "--dir", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    shown = {i["common_name"]: i for i in json.loads(result.output)}
    assert set(shown) == {"jobworker CA", "jobworker server", "admin", "bob"}
    assert "DNS:jobs.example.com" in shown["jobworker server"]["sans"]

    result = runner.invoke(main, ["certs", "show", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert "bob.pem" in result.output
    assert "DNS:jobs.example.com" in result.output


def test_cli_init_default_dir_is_var_certs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["certs", "init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "var" / "certs" / "ca.pem").is_file()


def test_cli_refusals_exit_1_with_the_message(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = str(tmp_path / "certs")
    assert runner.invoke(main, ["certs", "init", "--dir", directory]).exit_code == 0
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()

    result = runner.invoke(main, ["certs", "init", "--dir", directory])
    assert result.exit_code == 1
    assert "a CA already exists" in result.output
    assert "refusing to overwrite" in result.output
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca

    assert runner.invoke(main, ["certs", "issue", "bob", "--dir", directory]).exit_code == 0
    result = runner.invoke(main, ["certs", "issue", "bob", "--dir", directory])
    assert result.exit_code == 1
    assert "already exists" in result.output

    result = runner.invoke(main, ["certs", "issue", "server", "--dir", directory])
    assert result.exit_code == 1
    assert "reserved" in result.output


def test_cli_issue_without_ca(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["certs", "issue", "bob", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "certs init" in result.output


def test_cli_renew_server(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "certs"
    assert runner.invoke(main, ["certs", "init", "--dir", str(directory)]).exit_code == 0
    old = (directory / "server.pem").read_bytes()
    result = runner.invoke(
        main, ["certs", "renew-server", "--dir", str(directory), "--host", "192.0.2.7"]
    )
    assert result.exit_code == 0, result.output
    assert (directory / "server.pem").read_bytes() != old
    assert "IP:192.0.2.7" in certs.describe(directory / "server.pem")["sans"]


def _crl(pki: certs.PkiPaths) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(load(pki.ca_cert).public_key())  # type: ignore[arg-type]
    return crl


def test_revoke_by_name_finds_every_certificate_of_it(pki: certs.PkiPaths) -> None:
    assert list(_crl(pki)) == []  # init writes an empty one
    first, first_key = certs.issue_client(pki.directory, "bob")
    serial_1 = load(first).serial_number
    first.rename(pki.directory / "old-bob.pem")  # a second bob; the first still somewhere
    first_key.unlink()
    serial_2 = load(certs.issue_client(pki.directory, "bob")[0]).serial_number
    (pki.directory / "old-bob.pem").unlink()  # gone from the folder: ca/issued/ remembers it
    revoked, path = certs.revoke(pki.directory, "bob")
    assert path == pki.crl
    assert {r.serial for r in revoked} == {serial_1, serial_2}
    assert {e.serial_number for e in _crl(pki)} == {serial_1, serial_2}
    assert mode(pki.crl) == 0o644


def test_revoke_by_serial_keeps_what_was_revoked(pki: certs.PkiPaths) -> None:
    bob = load(certs.issue_client(pki.directory, "bob")[0]).serial_number
    certs.revoke(pki.directory, "bob")
    admin = load(pki.admin_cert).serial_number
    revoked, _ = certs.revoke(pki.directory, f"{admin:x}")
    assert [(r.serial, r.common_name) for r in revoked] == [(admin, "admin")]
    crl = _crl(pki)
    assert {e.serial_number for e in crl} == {bob, admin}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3


def test_revoke_refuses_an_unknown_name_and_the_ca(pki: certs.PkiPaths) -> None:
    with pytest.raises(certs.CertsError, match="no certificate of 'zed'"):
        certs.revoke(pki.directory, "zed")
    with pytest.raises(certs.CertsError, match="itself"):
        certs.revoke(pki.directory, f"{load(pki.ca_cert).serial_number:x}")


def test_cli_revoke(pki: certs.PkiPaths) -> None:
    result = CliRunner().invoke(main, ["certs", "revoke", "admin", "--dir", str(pki.directory)])
    assert result.exit_code == 0, result.output
    assert f"revoked serial {load(pki.admin_cert).serial_number:x} CN=admin" in result.output
    assert str(pki.crl) in result.output


def test_a_key_open_to_others_is_refused(pki: certs.PkiPaths) -> None:
    pki.server_key.chmod(0o640)
    with pytest.raises(certs.CertsError, match=r"chmod 600 .*server-key\.pem"):
        certs.read_pair(pki.server_cert, pki.server_key)


def test_the_ca_key_of_an_older_release_is_still_found(pki: certs.PkiPaths) -> None:
    pki.ca_key.rename(pki.legacy_ca_key)
    assert certs.issue_client(pki.directory, "bob")[0].exists()
