"""Signed global models: the server signs every message that carries global weights (Ed25519),
and a site verifies it before it loads any of those weights into a network or onto its disk.

What one signature covers (`signed_payload`): every entry of the message's ConfigRecord except
`signature` itself, as canonical JSON, where the server has added

    weights-sha256   `state_sha256` of the weights exactly as they travel, in the wire dtype
                     (`fed.transfer_dtype`; `records.from_array_record(..., as_sent=True)`:
                     every tensor's name, dtype, shape and bytes)
    signature-key    the SHA-256 fingerprint of the signing key (`ssh-keygen -lf` format)

So the phase, the round, the local steps, the scale factor, the checkpoint metadata the site
installs (`meta`, `vae-meta`) and every weight byte are bound together: changing any of them, or
the signature, makes the site refuse the message. Not covered: which run a message belongs to
(an old message of another run could be replayed by someone inside the TLS channel; phase and
round stop replays within a run).

Keys (`aldm-fed certs` makes the pair; `security.py`): the server signs with
`<fed.state>/signing/signing.key` (`server_signer`). `aldm-fed server --certs DIR` installs
`DIR/signing.key` there; `aldm-fed simulate`, and a server without certificates, make a fresh
pair there (`ensure_signing_pair`), so the simulation signs and verifies on the same code path.
A deployed site verifies with the `signing.pub` its SuperNode's node config names
(`signing-pub`, set by `aldm-fed client` from `--certs DIR` or `--signing-pub FILE`), never with
a key named by the server's run config; a simulated site with `<fed.state>/signing/signing.pub`.
A deployed site without a key (`--insecure` only) loads unverified weights and says so loudly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from aldm_fed.federation.records import from_array_record
from aldm_fed.io import atomic_path
from aldm_fed.training.common import state_sha256

__all__ = [
    "KEY_FIELD",
    "SIGNATURE_FIELD",
    "SIGNING_DIR",
    "WEIGHTS_FIELD",
    "SignatureError",
    "Signer",
    "Verifier",
    "ensure_signing_pair",
    "install_signing_pair",
    "open_global",
    "server_signer",
    "sign_content",
    "signed_payload",
    "signing_paths",
]

log = logging.getLogger(__name__)

SIGNING_DIR = "signing"  # in the server's fed.state
SIGNATURE_FIELD = "signature"  # hex Ed25519 signature of `signed_payload`
KEY_FIELD = "signature-key"  # fingerprint of the key that signed
WEIGHTS_FIELD = "weights-sha256"  # state_sha256 of the message's weights
_DOMAIN = b"aldm-fed global model v1\n"  # a signature made for anything else never verifies here


class SignatureError(ValueError):
    """A message's global weights were refused: unsigned, signed by another key, or altered."""


def signing_paths(state: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(private key, public key) of the server's signing pair in its state folder `fed.state`."""
    folder = Path(state) / SIGNING_DIR
    return folder / "signing.key", folder / "signing.pub"


def signed_payload(config: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the config entries except the signature, canonical JSON.

    Each value is tagged with its type, so 1, 1.0, True and "1" sign differently (a ConfigRecord
    keeps the type on the wire).

    Args:
        config: the message's ConfigRecord (or a dict of its entries).
    """
    fields = {key: _tagged(value) for key, value in config.items() if key != SIGNATURE_FIELD}
    return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _tagged(value: Any) -> Any:
    if isinstance(value, list):
        return ["list", [_tagged(v) for v in value]]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, bool | int | float | str):
        return [type(value).__name__, repr(value) if isinstance(value, float) else value]
    raise TypeError(f"config value {value!r} ({type(value).__name__}) cannot be signed")


def _fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    # As `ssh-keygen -lf` and security.public_key_fingerprint print it.
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Signer:
    """The server's Ed25519 signing key.

    Attributes:
        key: the private key.
        fingerprint: its public key's fingerprint (what sites compare with their signing.pub).
        path: the key file.
    """

    key: ed25519.Ed25519PrivateKey
    fingerprint: str
    path: Path

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Signer:
        """Load an unencrypted OpenSSH Ed25519 private key (`aldm-fed certs`' signing.key).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not an unencrypted OpenSSH Ed25519 private key.
        """
        path = Path(path)
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: a {type(key).__name__}, but global models are signed with Ed25519")
        return cls(key, _fingerprint(key.public_key()), path)

    def sign(self, arrays: ArrayRecord, config: Mapping[str, Any]) -> ConfigRecord:
        """`config` plus the weights' digest, this key's fingerprint and the signature.

        Args:
            arrays: the global weights the message carries.
            config: the message's other settings (phase, round, metadata, ...).
        """
        fields = {k: v for k, v in dict(config).items() if k != SIGNATURE_FIELD}
        fields[WEIGHTS_FIELD] = state_sha256(from_array_record(arrays, as_sent=True))  # the wire bytes
        fields[KEY_FIELD] = self.fingerprint
        return ConfigRecord({**fields, SIGNATURE_FIELD: self.key.sign(signed_payload(fields)).hex()})


@dataclass(frozen=True)
class Verifier:
    """A site's copy of the server's public signing key.

    Attributes:
        key: the public key.
        fingerprint: its fingerprint.
        path: the signing.pub file.
    """

    key: ed25519.Ed25519PublicKey
    fingerprint: str
    path: Path

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Verifier:
        """Load a one-line OpenSSH Ed25519 public key (`aldm-fed certs`' signing.pub).

        Raises:
            FileNotFoundError: no such file (the message says where it comes from).
            ValueError: not an OpenSSH Ed25519 public key.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: the server's model-signing public key is missing (signing.pub, made by "
                f"`aldm-fed certs`; give it to the site with --certs DIR or --signing-pub FILE)"
            )
        try:
            key = serialization.load_ssh_public_key(path.read_bytes().strip())
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"{path}: not an OpenSSH public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}: a {type(key).__name__}, but global models are signed with Ed25519")
        return cls(key, _fingerprint(key), path)

    def verify(self, content: RecordDict, groups: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Check a server message; return its weights, decoded once and verified.

        The order of the checks makes the error say what was wrong: no signature, another
        key, a signature that does not verify (settings, metadata or signature altered), then
        weights that do not hash to what was signed.

        Args:
            content: the message's content ("arrays" + "config").
            groups: the parameter groups expected (None: whatever the message holds).

        Raises:
            SignatureError: the message is refused (the text names the phase and round).
            ValueError: the weights hold other groups than `groups`.
        """
        config = dict(content["config"])
        where = _where(config)
        signature = config.get(SIGNATURE_FIELD)
        if signature is None:
            raise SignatureError(
                f"[{where}] refused the global weights: the message is unsigned, and this site only "
                f"loads models signed by {self.fingerprint} ({self.path}); is the server missing its "
                f"signing key?"
            )
        claimed = str(config.get(KEY_FIELD, "?"))
        if claimed != self.fingerprint:
            raise SignatureError(
                f"[{where}] refused the global weights: signed by an unknown key {claimed}; this site "
                f"trusts {self.fingerprint} ({self.path}) only: give it the server's signing.pub"
            )
        try:
            self.key.verify(bytes.fromhex(str(signature)), signed_payload(config))
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"[{where}] refused the global weights: the signature does not verify with "
                f"{self.fingerprint}: the message's settings, metadata or signature were altered on the way"
            ) from None
        sent = from_array_record(content["arrays"], groups, as_sent=True)  # hashed as they travelled
        got, signed = state_sha256(sent), str(config.get(WEIGHTS_FIELD))
        if got != signed:
            raise SignatureError(
                f"[{where}] refused the global weights: they hash to {got[:16]}..., the server signed "
                f"{signed[:16]}...: they were altered on the way"
            )
        # Sites train in float32 whatever the wire dtype (fed.transfer_dtype).
        return {g: {k: t.float() if t.is_floating_point() else t for k, t in state.items()}
                for g, state in sent.items()}


def _where(config: Mapping[str, Any]) -> str:
    phase = str(config.get("phase", "?"))
    return f"{phase} round {config['round']}" if "round" in config else phase


def sign_content(signer: Signer | None, content: RecordDict) -> RecordDict:
    """`content` ("arrays" + "config") with a signed config; unchanged when `signer` is None."""
    if signer is None:
        return content
    return RecordDict({**dict(content), "config": signer.sign(content["arrays"], content["config"])})


def open_global(
    content: RecordDict, verifier: Verifier | None, groups: Iterable[str], *, site: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of a server message as a site may use them: verified, or, without a key
    (a deployed `--insecure` site only), unverified with a warning.

    Args:
        content: the message's content.
        verifier: the site's public signing key; None = no key configured.
        groups: the parameter groups the phase expects.
        site: the site's name (for the warning).

    Raises:
        SignatureError: the message is refused.
    """
    if verifier is not None:
        return verifier.verify(content, groups)
    log.warning(
        "UNVERIFIED: site %s loads the global weights of %s WITHOUT checking the server's signature "
        "(no signing-pub in its node config); start it with --certs DIR or --signing-pub FILE",
        site, _where(dict(content["config"])),
    )
    return from_array_record(content["arrays"], groups)


# ------------------------------------------------------------------------------ keys on disk


def server_signer(state: str | os.PathLike[str]) -> Signer | None:
    """The server's signer from `<state>/signing/signing.key`; None (with a warning) if absent."""
    key, _ = signing_paths(state)
    if not key.is_file():
        log.warning("NOT SIGNING: %s does not exist; the global models go out unsigned and sites "
                    "that hold a signing.pub will refuse them", key)
        return None
    signer = Signer.from_file(key)
    log.info("signing the global models with %s (%s)", signer.fingerprint, key)
    return signer


def ensure_signing_pair(state: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A signing pair in `<state>/signing/`: the one there, else a new one (private key 0600).

    Returns:
        (private key, public key) paths.
    """
    key_path, pub_path = signing_paths(state)
    if key_path.is_file() and pub_path.is_file():
        signer = Signer.from_file(key_path)
        if Verifier.from_file(pub_path).fingerprint == signer.fingerprint:
            return key_path, pub_path
    key = ed25519.Ed25519PrivateKey.generate()
    _write_pair(key_path, pub_path, _private_bytes(key), _public_bytes(key.public_key()))
    log.info("made a signing key pair for the global models in %s", key_path.parent)
    return key_path, pub_path


def install_signing_pair(
    key: str | os.PathLike[str], pub: str | os.PathLike[str], state: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Copy a signing pair (`aldm-fed certs`' signing.key/.pub) into `<state>/signing/`.

    Raises:
        ValueError: the two files are not one pair (every site would refuse the models).
    """
    signer, verifier = Signer.from_file(key), Verifier.from_file(pub)
    if signer.fingerprint != verifier.fingerprint:
        raise ValueError(
            f"{key} and {pub} are not one key pair ({signer.fingerprint} vs {verifier.fingerprint}); "
            f"remake them with `aldm-fed certs --force`"
        )
    key_path, pub_path = signing_paths(state)
    _write_pair(key_path, pub_path, Path(key).read_bytes(), Path(pub).read_bytes())
    return key_path, pub_path


def _write_pair(key_path: Path, pub_path: Path, private: bytes, public: bytes) -> None:
    with atomic_path(key_path, mode=0o600) as tmp:
        tmp.write_bytes(private)
    with atomic_path(pub_path, mode=0o644) as tmp:
        tmp.write_bytes(public)


def _private_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _public_bytes(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
