"""Certificates and keys for the Flower deployment: valid X.509, a real TLS handshake, keys that
Flower's own loaders accept, safe file modes, no silent overwrites, and the `aldm-fed certs` command."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from aldm_fed.cli import app
from aldm_fed.federation.security import (
    CertificateSet,
    load_certificate_set,
    make_certificates,
    public_key_fingerprint,
)

HOSTS = ["127.0.0.1", "server.example.org"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("certs") / "certs", ["A", "B"], hosts=HOSTS, days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(certs):
    ca, server = _cert(certs.ca_cert), _cert(certs.server_cert)
    # The CA's signature over the server certificate (raises InvalidSignature if it is not).
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert server.issuer == ca.subject

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    now = dt.datetime.now(dt.timezone.utc)
    for cert in (ca, server):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert dt.timedelta(days=29) < cert.not_valid_after_utc - now <= dt.timedelta(days=30)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def _handshake(certs: CertificateSet, trusted_ca: Path, hostname: str = "127.0.0.1") -> bytes:
    """Serve one TLS connection with the server certificate; connect as a SuperNode would."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=str(trusted_ca))  # only this CA; hostname checked
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except OSError:  # ssl.SSLError included: the client refused the certificate
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                    return tls.recv(2)
        finally:
            thread.join(10)


def test_tls_handshake_with_the_ca_and_not_with_another(certs, tmp_path):
    assert _handshake(certs, certs.ca_cert) == b"ok"

    other = make_certificates(tmp_path / "other", ["A"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):  # not a host of the certificate
        _handshake(certs, certs.ca_cert, hostname="10.1.2.3")


def test_site_keys_load_with_flowers_own_loaders(certs):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import (
        _try_setup_client_authentication,
        load_ssh_private_key,
    )

    for site, (private, public) in certs.site_keys.items():
        # `flower-supernode --auth-supernode-private-key private`
        args = argparse.Namespace(auth_supernode_private_key=str(private), auth_supernode_public_key=None)
        key, derived_public = _try_setup_client_authentication(args)
        assert isinstance(key.curve, ec.SECP384R1), site
        # `flwr supernode register public CONNECTION` sends these bytes; the SuperLink compares
        # them with the key the SuperNode presents.
        assert try_load_public_key(public) == public_key_to_bytes(derived_public), site

    # Why OpenSSH format: the loader flower-supernode uses rejects PEM/PKCS#8 private keys.
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError):
        load_ssh_private_key(pkcs8, None)


def test_signing_pair_is_ed25519_in_flowers_format(certs):
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

    private = load_private_key(certs.signing_key)  # what `flwr app review` signs with
    public = serialization.load_ssh_public_key(certs.signing_pub.read_bytes())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert private.public_key() == public


def test_file_modes_and_manifest(certs):
    private = [certs.ca_key, certs.server_key, certs.signing_key]
    private += [pair.private for pair in certs.site_keys.values()]
    for path in private:
        assert _mode(path) == 0o600, path
    for path in [certs.ca_cert, certs.server_cert, certs.signing_pub, certs.site_keys["A"].public]:
        assert _mode(path) == 0o644, path
    assert _mode(certs.root) == _mode(certs.root / "sites") == 0o700

    manifest = json.loads(certs.manifest.read_text())
    assert manifest["hosts"] == HOSTS
    assert sorted(manifest["sites"]) == ["A", "B"]
    assert manifest["sites"]["A"] == {
        "key": "sites/A.key",
        "public": "sites/A.pub",
        "fingerprint": public_key_fingerprint(certs.site_keys["A"].public),
    }
    text = certs.manifest.read_text()
    assert "PRIVATE KEY" not in text and str(certs.root) not in text  # no secrets, relative paths


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_fingerprint_matches_ssh_keygen(certs):
    public = certs.site_keys["B"].public
    shown = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True)
    assert shown.stdout.split()[1] == public_key_fingerprint(public)


def test_no_overwrite_and_adding_a_site_reuses_the_ca(tmp_path):
    first = make_certificates(tmp_path / "c", ["A", "B", "C"], hosts=HOSTS)
    before = {p: p.read_bytes() for p in first.root.rglob("*") if p.is_file()}

    with pytest.raises(ValueError, match=r"sites/A\.key already exists.*--force"):
        make_certificates(tmp_path / "c", ["A", "B", "C"])
    with pytest.raises(ValueError, match=r"server\.crt exists for hosts.*--force"):
        make_certificates(tmp_path / "c", ["D"], hosts=["10.0.0.1"])
    assert {p: p.read_bytes() for p in first.root.rglob("*") if p.is_file()} == before

    added = make_certificates(tmp_path / "c", ["D"])  # hosts=None: keep the certificate's
    d_keys = added.site_keys["D"]
    assert set(added.written) == {d_keys.private, d_keys.public, added.manifest}
    for path, data in before.items():
        if path != added.manifest:
            assert path.read_bytes() == data, path  # CA, server certificate, other sites: unchanged
    assert sorted(json.loads(added.manifest.read_text())["sites"]) == ["A", "B", "C", "D"]

    # --force: a new CA and server certificate (same hosts), new keys for the listed sites only.
    forced = make_certificates(tmp_path / "c", ["A"], force=True)
    assert forced.ca_cert.read_bytes() != before[first.ca_cert]
    assert forced.site_keys["A"].private.read_bytes() != before[first.site_keys["A"].private]
    assert forced.site_keys["B"].private.read_bytes() == before[first.site_keys["B"].private]
    assert json.loads(forced.manifest.read_text())["hosts"] == HOSTS


@pytest.mark.parametrize("sites", [["A", "a b"], [""], ["../x"], ["A/B"], ["A", "A"]])
def test_bad_or_duplicate_sites_are_rejected(tmp_path, sites):
    bad = sites[-1]
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        make_certificates(tmp_path / "c", sites)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("host", ["http://server.org", "server.org:8000", "", "10.0.0.256", "-x.org", "a..b"])
def test_bad_hosts_are_rejected(tmp_path, host):
    with pytest.raises(ValueError, match=re.escape(repr(host))):
        make_certificates(tmp_path / "c", ["A"], hosts=["127.0.0.1", host])


def test_load_certificate_set_names_what_is_missing(tmp_path):
    made = make_certificates(tmp_path / "c", ["A"])
    loaded = load_certificate_set(tmp_path / "c", sites=["A"])
    assert loaded.site_keys == made.site_keys and loaded.server_key == made.server_key

    with pytest.raises(FileNotFoundError, match=r"sites/B\.key is missing.*aldm-fed certs"):
        load_certificate_set(tmp_path / "c", sites=["B"])
    made.server_key.unlink()
    with pytest.raises(FileNotFoundError, match=r"server\.key is missing.*aldm-fed certs"):
        load_certificate_set(tmp_path / "c")


def test_cli_certs(tmp_path):
    out = tmp_path / "certs"
    runner = CliRunner()
    result = runner.invoke(app, ["certs", "--out", str(out), "--sites", "A", "B", "C"])
    assert result.exit_code == 0, result.output
    for site in "ABC":
        assert (out / "sites" / f"{site}.key").is_file() and (out / "sites" / f"{site}.pub").is_file()
        assert f"flwr supernode register {out / 'sites' / site}.pub" in result.output
    assert public_key_fingerprint(out / "signing.pub") in result.output

    again = runner.invoke(app, ["certs", "--out", str(out), "--sites", "A", "B", "C"])
    assert again.exit_code == 2
    assert "error:" in again.output and "--force" in again.output

    more = runner.invoke(app, ["certs", "--out", str(out), "--sites", "D,E", "--sites", "F"])
    assert more.exit_code == 0, more.output
    assert sorted(load_certificate_set(out).site_keys) == list("ABCDEF")
