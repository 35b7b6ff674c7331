"""Artifact signatures: ed25519 keys, signing a manifest, and checking it against trusted public keys.

A signature (the manifest's `signature` field) signs the canonical manifest without `digest` and
`signature` (schema.body_sha256), with the signer's name and key id; since the manifest holds every
member's sha256, it covers the library and the weights too. Checksums alone prove integrity, not
origin: anyone can recompute them, so `load(path, trusted_keys=[...])` refuses an artifact that is
unsigned or not signed by one of those keys, before any of its native code is loaded.

Keys are the `cryptography` package's Ed25519 keys in PEM files (`forgeml keygen`). It is imported only
here and only when keys are used: loading without trusted keys costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgeml.errors import InvalidInput, ToolchainMissing, UntrustedArtifact
from forgeml.runtime import schema

if TYPE_CHECKING:
    from forgeml.runtime.artifact import Manifest

PRIVATE_KEY = "private.pem"
PUBLIC_KEY = "public.pem"
_CONTEXT = "forgeml artifact signature v1"


def _crypto() -> tuple[Any, Any, Any]:
    """cryptography's ed25519, serialization and InvalidSignature, or a one-line error saying what to install."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ToolchainMissing("signing and checking signatures need the 'cryptography' package: "
                               "pip install 'forgeml[sign]'") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_key: Any) -> str:
    """'sha256:' and the sha256 of the raw 32-byte public key: how a signature names its key."""
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def default_signer() -> str:
    """user@host, as ssh-keygen names keys."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _message(record: dict[str, Any], data: dict[str, Any]) -> bytes:
    """The bytes a signature signs: the manifest's body digest bound to the signer's name and key."""
    return schema.canonical_json({"context": _CONTEXT, "algorithm": record["algorithm"], "key_id": record["key_id"],
                                  "signer": record["signer"], "manifest_sha256": schema.body_sha256(data)})


class SigningKey:
    """An ed25519 private key ready to sign manifests, with the name signatures record."""

    def __init__(self, private_key: Any, signer: str, path: Path) -> None:
        self.private_key = private_key
        self.signer = signer
        self.path = path
        self.key_id = key_id(private_key.public_key())

    def sign_manifest(self, data: dict[str, Any]) -> dict[str, Any]:
        """The `signature` record for manifest `data` (JSON types; its digest and signature are ignored)."""
        record = {"algorithm": "ed25519", "key_id": self.key_id, "signer": self.signer}
        return record | {"value": self.private_key.sign(_message(record, data)).hex()}


def generate_keys(directory: str | Path) -> tuple[Path, Path, str]:
    """Write a new key pair: DIR/private.pem (mode 600) and DIR/public.pem. Never overwrites a key."""
    ed25519, serialization, _ = _crypto()
    directory = Path(directory)
    private, public = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    for path in (private, public):
        if path.exists():
            raise InvalidInput(f"{path} already exists; refusing to overwrite a key (choose another directory)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for path, data, mode in ((private, private_pem, 0o600), (public, public_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with open(fd, "wb") as f:
                f.write(data)
    except BaseException:
        for path in written:  # nothing half-written: neither key without the other
            path.unlink(missing_ok=True)
        raise
    return private, public, key_id(key.public_key())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{what} not found: {path}") from None
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path} ({e.strerror})") from None


def load_signing_key(path: str | Path, signer: str | None = None) -> SigningKey:
    """An ed25519 private key from a PEM file (`forgeml keygen`'s private.pem)."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: cryptography asks for the password
        raise InvalidInput(f"{path} is an encrypted key; forgeml signs with unencrypted keys "
                           "(`forgeml keygen`; keep the file private)") from None
    except (ValueError, UnicodeError):
        raise InvalidInput(f"{path} is not a private key in PEM format (make one with `forgeml keygen DIR`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidInput(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 private key "
                           "(make one with `forgeml keygen DIR`)")
    return SigningKey(key, signer or default_signer(), path)


def load_public_key(path: str | Path) -> tuple[str, Any]:
    """(key id, key) of an ed25519 public key in a PEM file (`forgeml keygen`'s public.pem)."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnicodeError):
        raise InvalidInput(f"trusted key {path} is not a public key in PEM format "
                           "(the public.pem that `forgeml keygen` wrote)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InvalidInput(f"trusted key {path} is not an Ed25519 public key")
    return key_id(key), key


def check_signature(data: dict[str, Any], trusted_keys: Iterable[str | Path] | str | Path,
                    where: str) -> dict[str, Any]:
    """Refuse manifest `data` unless one of `trusted_keys` (public key files) signed it; its signature record.

    Checks only the manifest: the caller verifies the members against the checksums in it."""
    if isinstance(trusted_keys, (str, os.PathLike)):  # one key file given as such
        trusted_keys = [trusted_keys]
    trusted_keys = list(trusted_keys)
    if not trusted_keys:
        raise InvalidInput("trusted_keys is empty: give at least one public key file, or None to skip the check")
    keys = dict(load_public_key(p) for p in trusted_keys)
    record = data.get(schema.SIGNATURE)
    if record is None:
        raise UntrustedArtifact(f"{where} is not signed, and trusted keys were given; refusing to load it "
                                "(sign it with `forgeml sign`)")
    public = keys.get(record["key_id"])
    if public is None:
        raise UntrustedArtifact(f"{where} is signed by '{record['signer'][:80]}' with key {record['key_id'][:23]}..., "
                                f"which is not among the {len(keys)} trusted key(s); refusing to load it")
    _, _, invalid_signature = _crypto()
    try:
        public.verify(bytes.fromhex(record["value"]), _message(record, data))
    except invalid_signature:
        raise UntrustedArtifact(f"{where}: the signature by '{record['signer'][:80]}' does not match the manifest "
                                "(tampered with after signing); refusing to load it") from None
    return record


def sign_artifact(path: str | Path, key: SigningKey, output: str | Path | None = None) -> Manifest:
    """Sign an existing artifact (its members are verified first); written atomically to `output`
    (default: in place). Any earlier signature is replaced."""
    from forgeml.runtime.artifact import open_artifact, write_artifact

    artifact = open_artifact(path)
    artifact.verify_checksums()
    files = {name: artifact.read_member(name) for name in artifact.manifest.members}
    write_artifact(output or path, artifact.manifest, files, signing_key=key)
    return artifact.manifest
