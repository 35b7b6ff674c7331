"""The artifact format: one uncompressed tar (`*.fml`) holding manifest.json, the compiled library
and the weights, with the sha256 of every member in the manifest.

Only numpy and the standard library are used here: the runtime reads artifacts on devices that
have no compiler. Weights are raw little-endian bytes in `weights.bin`, each tensor 64-byte aligned,
so they can be memory-mapped straight out of the tar without a copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
_ALIGN = 64


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"])

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class WeightEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # byte offset inside weights.bin
    nbytes: int


@dataclass
class Manifest:
    """What an artifact holds and how it was made. Stored as manifest.json."""

    target: dict[str, Any]  # {"name", "target", "arch", "device"}
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    library: str  # member name of the compiled shared library
    weights: list[WeightEntry] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)  # member -> sha256
    source: dict[str, Any] = field(default_factory=dict)
    compile_options: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        d["weights"] = [asdict(w) | {"shape": list(w.shape)} for w in self.weights]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "artifact") -> Manifest:
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{where}: manifest has no format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where} has artifact format {version}, newer than this runtime understands "
                f"({FORMAT_VERSION}); upgrade forgeml to load it"
            )
        try:
            return cls(
                target=d["target"],
                inputs=[TensorSpec.from_json(t) for t in d["inputs"]],
                outputs=[TensorSpec.from_json(t) for t in d["outputs"]],
                library=d["library"],
                weights=[WeightEntry(w["name"], tuple(w["shape"]), w["dtype"], w["offset"], w["nbytes"])
                         for w in d.get("weights", [])],
                members=d.get("members", {}),
                source=d.get("source", {}),
                compile_options=d.get("compile_options", {}),
                tuning=d.get("tuning", {}),
                verification=d.get("verification", {}),
                versions=d.get("versions", {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: manifest is malformed ({type(e).__name__}: {e})") from None


def pack_weights(named: list[tuple[str, np.ndarray]]) -> tuple[bytes, list[WeightEntry]]:
    """Concatenate tensors into one blob, each at a 64-byte aligned offset."""
    buf = io.BytesIO()
    entries = []
    for name, array in named:
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        pad = (-buf.tell()) % _ALIGN
        buf.write(b"\0" * pad)
        entries.append(WeightEntry(name, tuple(array.shape), str(array.dtype), buf.tell(), array.nbytes))
        buf.write(array.tobytes())
    return buf.getvalue(), entries


def write_artifact(path: str | Path, manifest: Manifest, files: dict[str, bytes]) -> Path:
    """Write the artifact atomically: a temp file beside `path`, then rename. `files` are the members
    other than the manifest; their checksums are recorded in the manifest."""
    path = Path(path)
    manifest.members = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest_bytes = json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    import tarfile  # writing is the compiler's job: the runtime does not pay for these imports
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in [(MANIFEST, manifest_bytes), *files.items()]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class ArtifactFile:
    """An opened artifact: manifest parsed, members located (not yet verified)."""

    path: Path
    manifest: Manifest
    offsets: dict[str, tuple[int, int]]  # member -> (data offset in the file, size)

    def read_member(self, name: str) -> bytes:
        offset, size = self.offsets[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def verify_checksums(self) -> None:
        """Hash every member against the manifest; raise on any mismatch or missing member."""
        for name, expected in self.manifest.members.items():
            if name not in self.offsets:
                raise ArtifactError(f"{self.path}: member '{name}' listed in the manifest is missing")
            digest = hashlib.sha256()
            offset, size = self.offsets[name]
            with open(self.path, "rb") as f:
                f.seek(offset)
                remaining = size
                while remaining:
                    chunk = f.read(min(remaining, 1 << 22))
                    if not chunk:
                        raise ArtifactError(f"{self.path}: member '{name}' is truncated")
                    digest.update(chunk)
                    remaining -= len(chunk)
            if digest.hexdigest() != expected:
                raise ArtifactError(
                    f"{self.path}: checksum mismatch in '{name}' (tampered or damaged); refusing to load it"
                )
        extra = set(self.offsets) - set(self.manifest.members) - {MANIFEST}
        if extra:
            raise ArtifactError(f"{self.path}: unexpected members not in the manifest: {', '.join(sorted(extra))}")

    def map_weights(self) -> list[np.ndarray]:
        """Weights as copy-on-write memory maps into the artifact file (64-byte aligned)."""
        if not self.manifest.weights:
            return []
        base, _ = self.offsets[WEIGHTS]
        arrays = []
        for w in self.manifest.weights:
            count = int(np.prod(w.shape, dtype=np.int64))
            arr = np.memmap(self.path, dtype=np.dtype(w.dtype), mode="c", offset=base + w.offset, shape=(count,))
            arrays.append(np.asarray(arr).reshape(w.shape) if count else np.zeros(w.shape, w.dtype))
        return arrays


def open_artifact(path: str | Path) -> ArtifactFile:
    """Open an artifact and parse its manifest. Nothing native is loaded here."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a .fml artifact")
    offsets = _plain_ustar_members(path)
    if offsets is None:  # not the plain ustar layout write_artifact produces: let tarfile read it
        offsets = _tar_members(path)
    if MANIFEST not in offsets:
        raise ArtifactError(f"{path} is not a forgeml artifact (no {MANIFEST})")
    offset, size = offsets[MANIFEST]
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest.json is not valid JSON ({e})") from None
    manifest = Manifest.from_json(data, where=str(path))
    return ArtifactFile(path, manifest, offsets)


def _tar_members(path: Path) -> dict[str, tuple[int, int]]:
    import tarfile  # 8 ms of imports the usual artifact does not need (see _plain_ustar_members)

    try:
        with tarfile.open(path, mode="r:") as tar:
            return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable forgeml artifact ({e})") from None


def _plain_ustar_members(path: Path) -> dict[str, tuple[int, int]] | None:
    """member -> (data offset, size) of a tar made only of regular files with plain ustar headers (what
    write_artifact writes), read from the 512-byte headers; None for anything else (pax or GNU
    headers, links, bad checksums, truncation): tarfile then reads it and reports what is wrong."""
    offsets: dict[str, tuple[int, int]] = {}
    try:
        with open(path, "rb") as f:
            pos = 0
            while True:
                f.seek(pos)
                header = f.read(512)
                if len(header) < 512:
                    return None
                if header == bytes(512):
                    return offsets  # end-of-archive block
                if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0":
                    return None
                checksum = int(header[148:156].split(b"\0")[0].strip() or b"-1", 8)
                if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                    return None
                size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
                offsets[header[:100].split(b"\0")[0].decode("utf-8")] = (pos + 512, size)
                pos += 512 + (size + 511) // 512 * 512
    except (OSError, ValueError, UnicodeDecodeError):
        return None
