"""TLS certificates and keys for a Flower deployment: a private CA, the SuperLink's certificate,
one SuperNode authentication key per site and a signing key for global models.

`make_certificates` (`aldm-fed certs`) fills one folder on the server:

    ca.crt          self-signed CA certificate (EC P-384)           -> server and every site
    ca.key          the CA's private key (0600)                     -> stays with whoever signs
    server.crt      SuperLink TLS certificate, SANs = the hosts     -> server
    server.key      its private key (0600)                          -> server
    sites/<S>.key   site S's SuperNode key, OpenSSH private (0600)  -> site S only
    sites/<S>.pub   its public key, OpenSSH one-line format         -> `flwr supernode register`
    signing.key     Ed25519 key that signs global models (0600)     -> server
    signing.pub     its public key, OpenSSH one-line format         -> every site
    manifest.json   what was made: relative paths, hosts, expiry, fingerprints (no secrets)

The formats are the ones Flower 1.42 itself loads:
- SuperLink `--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key`: PEM
  certificates and a PKCS#8 PEM key (read by gRPC and by uvicorn through Python's `ssl`).
- SuperNode `--root-certificates ca.crt` (PEM) and `--auth-supernode-private-key sites/S.key`,
  read with `load_ssh_private_key` (flwr/supernode/cli/flower_supernode.py): ONLY the OpenSSH
  private format ("BEGIN OPENSSH PRIVATE KEY") of a NIST-curve EC key; PEM/PKCS#8 is rejected.
- `flwr supernode register sites/S.pub CONNECTION` reads the key with `load_ssh_public_key`
  (flwr/cli/supernode/register.py): an OpenSSH "ecdsa-sha2-nistp384 ..." line.
- Ed25519 in OpenSSH format is also what Flower's app-bundle signing uses (`flwr app review`,
  SuperNode `--trusted-entities`), so the signing pair works with those tools too.

Site keys are not signed by the CA: the SuperLink trusts exactly the public keys registered with
it. That is why sites can be added to an existing folder without touching the CA or other sites.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aldm_fed.io import atomic_path, atomic_write_json

__all__ = [
    "DEFAULT_HOSTS",
    "CertificateSet",
    "SiteKeys",
    "certificate_fingerprint",
    "describe",
    "load_certificate_set",
    "make_certificates",
    "public_key_fingerprint",
]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_MANIFEST = "manifest.json"
_CA_CERT, _CA_KEY = "ca.crt", "ca.key"
_SERVER_CERT, _SERVER_KEY = "server.crt", "server.key"
_SIGNING_KEY, _SIGNING_PUB = "signing.key", "signing.pub"
_SITES = "sites"
_PRIVATE, _PUBLIC = 0o600, 0o644
_SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Certificates start a few minutes in the past, so a machine whose clock is behind accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class SiteKeys(NamedTuple):
    """A site's SuperNode authentication key pair."""

    private: Path
    public: Path


@dataclass(frozen=True)
class CertificateSet:
    """Paths of one deployment's certificates and keys (see the module docstring for the roles).

    Attributes:
        root: the folder.
        ca_cert: the CA certificate every party trusts.
        ca_key: the CA's private key; None when it was moved out of the folder (it is only needed
            to make a new server certificate).
        server_cert: the SuperLink's TLS certificate.
        server_key: its private key.
        site_keys: site -> (private, public) SuperNode authentication keys.
        signing_key: Ed25519 private key that signs global models (stays on the server).
        signing_pub: its public key, given to every site to verify the models it receives.
        manifest: manifest.json.
        written: the files the call that returned this set wrote (empty when loaded).
    """

    root: Path
    ca_cert: Path
    ca_key: Path | None
    server_cert: Path
    server_key: Path
    site_keys: dict[str, SiteKeys]
    signing_key: Path
    signing_pub: Path
    manifest: Path
    written: tuple[Path, ...] = ()


def make_certificates(
    out_dir: str | os.PathLike[str],
    sites: Sequence[str],
    *,
    hosts: Sequence[str] | None = None,
    days: int = 365,
    force: bool = False,
) -> CertificateSet:
    """Make (or extend) the certificates and keys of a deployment in `out_dir`.

    Without `force` nothing is overwritten: an existing CA, server certificate and signing key are
    reused, so calling again with only new site names adds those sites. With `force` the CA, the
    server certificate, the signing key and the keys of the listed sites are all made anew (every
    site then needs the new ca.crt); keys of unlisted sites are kept.

    Args:
        out_dir: the folder (created with mode 0700 if missing).
        sites: site names (letters, digits, "-", "_"), one key pair each; may be empty.
        hosts: IP addresses and DNS names by which SuperNodes reach the SuperLink; they become
            the server certificate's subjectAltNames. None: keep the existing certificate's hosts,
            or 127.0.0.1 and localhost for a new one.
        days: validity of new certificates.
        force: replace existing files instead of refusing.

    Returns:
        The paths of the whole folder (including earlier sites), with `written` set.

    Raises:
        ValueError: a bad site name or host, duplicate sites, days < 1, a file that exists
            (without `force`), a server certificate for other hosts (without `force`), or an
            inconsistent existing CA.
    """
    root = Path(out_dir)
    sites = _check_sites(sites)
    new_hosts = None if hosts is None else _check_hosts(hosts)
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    paths = _paths(root, sites)

    # 1. Decide everything before writing anything, so a refusal leaves the folder as it was.
    if force:
        make_ca = make_server = make_signing = True
    else:
        make_server = _pair_missing(paths.server_cert, paths.server_key)
        make_ca = not paths.ca_cert.exists()
        make_signing = _pair_missing(paths.signing_key, paths.signing_pub)
        _check_can_extend(paths, sites, new_hosts, make_ca=make_ca, make_server=make_server)

    files: dict[Path, tuple[bytes, int]] = {}  # path -> (content, mode), written in step 5
    now = dt.datetime.now(dt.timezone.utc)
    # 2. The SuperLink's TLS certificate, signed by a new CA or by the existing one.
    if make_server:
        if make_ca:
            ca_key = ec.generate_private_key(ec.SECP384R1())
            ca_cert = _self_signed_ca(ca_key, now, days)
            files[root / _CA_KEY] = (_private_pem(ca_key), _PRIVATE)
            files[paths.ca_cert] = (_pem(ca_cert), _PUBLIC)
        else:
            ca_cert, ca_key = _load_ca(paths.ca_cert, root / _CA_KEY, now)
        if new_hosts is None and paths.server_cert.exists():  # --force without --host
            with contextlib.suppress(ValueError):  # unreadable: fall back to the defaults
                new_hosts = _certificate_hosts(_read_certificate(paths.server_cert))
        server_key = ec.generate_private_key(ec.SECP384R1())
        cert = _server_certificate(server_key, ca_cert, ca_key, new_hosts or DEFAULT_HOSTS, now, days)
        files[paths.server_key] = (_private_pem(server_key), _PRIVATE)
        files[paths.server_cert] = (_pem(cert), _PUBLIC)
    # 3. SuperNode keys: P-384, the curve of `ssh-keygen -t ecdsa -b 384` in Flower's docs.
    for site in sites:
        site_key = ec.generate_private_key(ec.SECP384R1())
        files[paths.site_keys[site].private] = (_private_openssh(site_key), _PRIVATE)
        files[paths.site_keys[site].public] = (_openssh_public(site_key), _PUBLIC)
    # 4. The model-signing pair.
    if make_signing:
        signing_key = ed25519.Ed25519PrivateKey.generate()
        files[paths.signing_key] = (_private_openssh(signing_key), _PRIVATE)
        files[paths.signing_pub] = (_openssh_public(signing_key), _PUBLIC)
    # 5. Write: each file atomically, private keys 0600 from the start, in folders only the owner
    # can list; then the manifest, which describes the whole folder, earlier sites included.
    for path, (data, mode) in files.items():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_path(path, mode=mode) as tmp:  # the temporary file is made 0600 (mkstemp)
            tmp.write_bytes(data)
    result = _scan(root)
    atomic_write_json(result.manifest, _manifest(result, now))
    return dataclasses.replace(result, written=(*files, result.manifest))


def load_certificate_set(
    root: str | os.PathLike[str], sites: Sequence[str] | None = None
) -> CertificateSet:
    """The certificates and keys made by `make_certificates` in `root`.

    Args:
        root: the folder.
        sites: sites whose key pairs must be present (default: none required).

    Returns:
        The paths; `site_keys` holds every site found under sites/.

    Raises:
        FileNotFoundError: a file is missing (the message names it and the command to run).
    """
    root = Path(root)
    result = _scan(root)
    required = [result.ca_cert, result.server_cert, result.server_key, result.signing_key]
    required += [result.signing_pub]
    for site in sites or ():
        required += result.site_keys.get(site, _site_paths(root, site))
    for site_pair in result.site_keys.values():
        required += site_pair
    for path in required:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run `aldm-fed certs --out {root} --sites ...` (add --force to"
                " start over)"
            )
    return result


def public_key_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 fingerprint of an OpenSSH public key file, as `ssh-keygen -lf PATH` prints it.

    Args:
        path: a one-line OpenSSH public key ("ecdsa-sha2-nistp384 AAAA...", "ssh-ed25519 ...").

    Returns:
        "SHA256:" + unpadded base64 of the SHA-256 of the key blob.

    Raises:
        ValueError: the file is not an OpenSSH public key.
    """
    path = Path(path)
    parts = path.read_bytes().split()
    if len(parts) < 2:
        raise ValueError(f"{path}: not an OpenSSH public key")
    serialization.load_ssh_public_key(b" ".join(parts[:2]))  # raises ValueError if malformed
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def certificate_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 fingerprint of a PEM certificate, as `openssl x509 -noout -fingerprint -sha256`.

    Args:
        path: a PEM certificate.

    Returns:
        Colon-separated upper-case hex of the SHA-256 of the DER certificate.
    """
    digest = _read_certificate(Path(path)).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def describe(certs: CertificateSet) -> str:
    """What the folder holds (fingerprints, to compare over the phone) and which file goes where.

    Args:
        certs: from `make_certificates` (its `written` files are listed first) or
            `load_certificate_set`.

    Returns:
        Several lines of text, for the `aldm-fed certs` command to print.
    """
    root = certs.root

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    server = _read_certificate(certs.server_cert)
    lines = [f"certificates and keys in {root}/"]
    if certs.written:
        lines.append(f"  wrote: {', '.join(rel(p) for p in certs.written)}")
    lines += [
        f"  CA          {rel(certs.ca_cert):<14} sha256 {certificate_fingerprint(certs.ca_cert)}",
        f"  SuperLink   {rel(certs.server_cert):<14} hosts {', '.join(_certificate_hosts(server))};"
        f" expires {server.not_valid_after_utc:%Y-%m-%d}",
        f"  signing     {rel(certs.signing_pub):<14} {public_key_fingerprint(certs.signing_pub)}",
    ]
    for site, pair in certs.site_keys.items():
        lines.append(f"  site {site:<6} {rel(pair.public):<14} {public_key_fingerprint(pair.public)}")
    lines += [
        "next steps:",
        "  on the server (keep server.key, signing.key and ca.key there; ca.key is needed only to"
        " sign a new server certificate):",
        f"    flower-superlink --ssl-ca-certfile {certs.ca_cert} --ssl-certfile {certs.server_cert}"
        f" --ssl-keyfile {certs.server_key} --enable-supernode-auth ...",
        "    register each site once the SuperLink runs:",
    ]
    for pair in certs.site_keys.values():
        lines.append(f"    flwr supernode register {pair.public} CONNECTION")
    lines.append("  to each site S, copy ca.crt, signing.pub and sites/S.key (that site's key only), then:")
    lines.append(
        "    flower-supernode --root-certificates ca.crt --auth-supernode-private-key S.key"
        " --superlink HOST:PORT ..."
    )
    return "\n".join(lines)


def _check_sites(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):  # a bare string would be taken as one site per character
        raise ValueError(f"sites must be a list of names, got the string {sites!r}")
    seen: set[str] = set()
    for site in sites:
        if not _SITE_NAME.fullmatch(site):
            raise ValueError(f"bad site name {site!r}: use letters, digits, '-' and '_' only")
        if site in seen:
            raise ValueError(f"site {site!r} is listed twice")
        seen.add(site)
    return list(sites)


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, str):
        raise ValueError(f"hosts must be a list of names, got the string {hosts!r}")
    if not hosts:
        raise ValueError("at least one host is needed for the server certificate")
    checked: list[str] = []
    for host in hosts:
        try:
            name = str(ipaddress.ip_address(host))
        except ValueError:
            labels = host.rstrip(".").split(".")
            # An all-digit last label is a mistyped IPv4 address ("10.0.0.256"), not a name.
            bad = not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit()
            if bad or len(host) > 253:
                raise ValueError(
                    f"bad host {host!r}: give an IP address or a DNS name, without scheme or port"
                ) from None
            name = host.rstrip(".").lower()
        if name not in checked:  # duplicates are harmless; keep the SAN list clean
            checked.append(name)
    return checked


def _site_paths(root: Path, site: str) -> SiteKeys:
    return SiteKeys(root / _SITES / f"{site}.key", root / _SITES / f"{site}.pub")


def _paths(root: Path, sites: Sequence[str]) -> CertificateSet:
    return CertificateSet(
        root=root,
        ca_cert=root / _CA_CERT,
        ca_key=root / _CA_KEY,
        server_cert=root / _SERVER_CERT,
        server_key=root / _SERVER_KEY,
        site_keys={site: _site_paths(root, site) for site in sites},
        signing_key=root / _SIGNING_KEY,
        signing_pub=root / _SIGNING_PUB,
        manifest=root / _MANIFEST,
    )


def _scan(root: Path) -> CertificateSet:
    """The paths of `root`, with every site that has a key or public key under sites/."""
    folder = root / _SITES
    names = sorted({p.stem for p in folder.glob("*.key")} | {p.stem for p in folder.glob("*.pub")})
    paths = _paths(root, names)
    return paths if (root / _CA_KEY).exists() else dataclasses.replace(paths, ca_key=None)


def _pair_missing(first: Path, second: Path) -> bool:
    """True if neither file exists; a lone half of a pair is an error (which file is stale?)."""
    if first.exists() != second.exists():
        present, absent = (first, second) if first.exists() else (second, first)
        raise ValueError(
            f"{present} exists but {absent} does not; restore it, or pass --force to make both anew"
        )
    return not first.exists()


def _check_can_extend(
    paths: CertificateSet,
    sites: Sequence[str],
    hosts: Sequence[str] | None,
    *,
    make_ca: bool,
    make_server: bool,
) -> None:
    """Raise unless the folder can take the new files without overwriting any (no --force)."""
    ca_key = paths.root / _CA_KEY
    if make_ca:  # a new CA invalidates whatever an old, vanished CA signed
        for path in (ca_key, paths.server_cert):
            if path.exists():
                raise ValueError(
                    f"{path} exists but {paths.ca_cert} does not; restore it, or pass --force to start"
                    " over"
                )
    elif make_server and not ca_key.exists():
        raise ValueError(
            f"{ca_key} is needed to sign a new {paths.server_cert.name}; restore it, or pass --force"
            " to make a new CA"
        )
    if not make_server and hosts is not None:
        old_hosts = _certificate_hosts(_read_certificate(paths.server_cert))
        if sorted(old_hosts) != sorted(hosts):
            raise ValueError(
                f"{paths.server_cert} exists for hosts {', '.join(old_hosts)}, not {', '.join(hosts)};"
                " pass --force to make a new CA and server certificate"
            )
    for site in sites:
        for path in paths.site_keys[site]:
            if path.exists():
                raise ValueError(
                    f"{path} already exists: list only new sites to add them, or pass --force to"
                    " replace the keys of the listed sites (and the CA)"
                )


def _load_ca(
    cert_path: Path, key_path: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _read_certificate(cert_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}; pass --force to make a new CA")
    if cert.not_valid_after_utc <= now:
        raise ValueError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; pass --force")
    return cert, key


def _read_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _certificate_hosts(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ips + san.get_values_for_type(x509.DNSName)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aldm-fed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime, days: int) -> x509.Certificate:
    name = _name("aldm-fed federation CA")
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    # A certificate outliving its issuer would fail verification after the CA expires anyway.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("aldm-fed SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        # Clients match the host against the SANs only; the CN is informational (and a CN is
        # limited to 64 characters, a DNS name is not).
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _openssh_public(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return key.public_key().public_bytes(encoding, fmt) + b"\n"


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: what gRPC and Python's ssl read as a TLS key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _private_openssh(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """OpenSSH format, unencrypted: the only one Flower's `load_ssh_private_key` accepts."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _manifest(paths: CertificateSet, now: dt.datetime) -> dict:
    def rel(path: Path) -> str:
        return path.relative_to(paths.root).as_posix()

    ca = _read_certificate(paths.ca_cert)
    server = _read_certificate(paths.server_cert)
    return {
        "format": 1,
        "updated": now.isoformat(timespec="seconds"),
        "hosts": _certificate_hosts(server),
        "expires": min(ca.not_valid_after_utc, server.not_valid_after_utc).isoformat(),
        "ca": {
            "cert": rel(paths.ca_cert),
            "key": rel(paths.ca_key) if paths.ca_key is not None else None,
            "sha256": certificate_fingerprint(paths.ca_cert),
            "expires": ca.not_valid_after_utc.isoformat(),
        },
        "server": {
            "cert": rel(paths.server_cert),
            "key": rel(paths.server_key),
            "sha256": certificate_fingerprint(paths.server_cert),
            "expires": server.not_valid_after_utc.isoformat(),
        },
        "signing": {
            "key": rel(paths.signing_key),
            "public": rel(paths.signing_pub),
            "fingerprint": public_key_fingerprint(paths.signing_pub),
        },
        "sites": {
            site: {
                "key": rel(pair.private),
                "public": rel(pair.public),
                "fingerprint": public_key_fingerprint(pair.public),
            }
            for site, pair in paths.site_keys.items()
        },
    }
