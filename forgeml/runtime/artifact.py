"""The artifact format: one uncompressed tar (`*.fml`) holding manifest.json, the compiled library
and the weights, with the sha256 of every member in the manifest, and the manifest's own digest (the
integrity root: schema.py) in it.

Only numpy and the standard library are used here: the runtime reads artifacts on devices that
have no compiler. Weights are raw little-endian bytes in `weights.bin`, each tensor 64-byte aligned,
so they can be read straight out of the tar into one aligned buffer and used in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from forgeml.errors import ArtifactError
from forgeml.runtime import schema
from forgeml.runtime.schema import FORMAT_VERSION

MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
_ALIGN = 64

# NamedTuples and plain classes, not dataclasses: each dataclass costs ~1.5 ms to create at import,
# which every process that loads a model pays.


class TensorSpec(NamedTuple):
    """A model input or output: name, static shape and numpy dtype name; for an input the run-time
    check needs, the values it may take (`valid_range`, inclusive: a Gather's indices, since compiled
    gathers do not check bounds; a training-mode Dropout's ratio, [0, 0]): the runtime refuses others.
    `kind` "sequence" (outputs only): a list of tensors of `dtype`, each with its own shape (`shape` is
    then empty; manifest `{"name", "kind": "sequence", "dtype"}`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    valid_range: tuple[int, int] | None = None
    dynamic: tuple[DynamicDim, ...] = ()  # the axes that vary at run time (their `shape` entry is -1)
    kind: str = "tensor"

    def to_json(self) -> dict[str, Any]:
        if self.kind == "sequence":
            return {"name": self.name, "kind": self.kind, "dtype": self.dtype}
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.valid_range is not None:
            d["range"] = list(self.valid_range)
        if self.dynamic:
            d["dynamic"] = [dim._asdict() for dim in self.dynamic]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        if d.get("kind") == "sequence":
            return cls(d["name"], (), d["dtype"], kind="sequence")
        bounds = d.get("range")
        dynamic = tuple(DynamicDim(int(x["axis"]), str(x["variable"]), int(x["min"]), int(x["max"]))
                        for x in d.get("dynamic", ()))
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"],
                   (int(bounds[0]), int(bounds[1])) if bounds is not None else None, dynamic)

    def describe(self) -> str:
        if self.kind == "sequence":
            return f"{self.name}: sequence of {self.dtype} tensors"
        bounds = f" in [{self.valid_range[0]}, {self.valid_range[1]}]" if self.valid_range else ""
        ranges = {dim.axis: f"{dim.min}..{dim.max}" for dim in self.dynamic}
        dims = ", ".join(ranges.get(n, "?" if d < 0 else str(d)) for n, d in enumerate(self.shape))  # ?: known
        return f"{self.name}: {self.dtype}[{dims}]{bounds}"  # only at run time


class DynamicDim(NamedTuple):
    """An input axis that may take any size in [min, max] at run time; axes (of any inputs) that share a
    `variable` (an ONNX dim_param) must have the same size in one call."""

    axis: int
    variable: str
    min: int
    max: int


class WeightEntry(NamedTuple):
    """One weight tensor inside weights.bin."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # byte offset inside weights.bin
    nbytes: int


class Manifest:
    """What an artifact holds and how it was made. Stored as manifest.json, with `digest` (the sha256 of
    the rest, schema.manifest_digest) and, when signed, `signature` (trust.py); write_artifact sets both."""

    def __init__(
        self,
        target: dict[str, Any],  # {"name", "target", "arch", "device"}
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        library: str,  # member name of the compiled shared library
        weights: list[WeightEntry] | None = None,
        members: dict[str, str] | None = None,  # member -> sha256
        source: dict[str, Any] | None = None,
        compile_options: dict[str, Any] | None = None,
        tuning: dict[str, Any] | None = None,
        verification: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
        format_version: int = FORMAT_VERSION,
        digest: str | None = None,
        signature: dict[str, str] | None = None,
        functions: list[dict[str, Any]] | None = None,  # dynamic shapes: the VM functions and their weights
    ) -> None:
        self.target = target
        self.inputs = inputs
        self.outputs = outputs
        self.library = library
        self.weights = [] if weights is None else weights
        self.members = {} if members is None else members
        self.source = {} if source is None else source
        self.compile_options = {} if compile_options is None else compile_options
        self.tuning = {} if tuning is None else tuning
        self.verification = {} if verification is None else verification
        self.versions = {} if versions is None else versions
        self.format_version = format_version
        self.digest = digest
        self.signature = signature
        self.functions = functions

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Manifest({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, a deep copy: editing it leaves the manifest as it was."""
        import copy

        fields = {k: v for k, v in vars(self).items()
                  if v is not None or k not in (schema.DIGEST, schema.SIGNATURE, "functions")}
        return copy.deepcopy({**fields, "inputs": [t.to_json() for t in self.inputs],
                              "outputs": [t.to_json() for t in self.outputs],
                              "weights": [w._asdict() | {"shape": list(w.shape)} for w in self.weights]})

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "artifact") -> Manifest:
        """A manifest from its JSON data, checked against the schema (one-line ArtifactError naming the
        first bad field). The digest's value is checked where the bytes are read (open_artifact)."""
        schema.validate(d, where)
        return cls._from_valid(d)

    @classmethod
    def _from_valid(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            target=d["target"],
            inputs=[TensorSpec.from_json(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_json(t) for t in d["outputs"]],
            library=d["library"],
            weights=[WeightEntry(w["name"], tuple(w["shape"]), w["dtype"], w["offset"], w["nbytes"])
                     for w in d.get("weights", [])],
            members=d["members"],
            source=d.get("source", {}),
            compile_options=d.get("compile_options", {}),
            tuning=d.get("tuning", {}),
            verification=d.get("verification", {}),
            versions=d.get("versions", {}),
            format_version=d["format_version"],
            digest=d[schema.DIGEST],
            signature=d.get(schema.SIGNATURE),
            functions=d.get("functions"),
        )


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


def create_beside(path: Path) -> tuple[int, Path]:
    """A new temp file in `path`'s directory, open for writing: (fd, its path), for a write that ends by
    renaming it to `path`. Its mode is 0o666 less the umask, as for any file `open` creates
    (tempfile.mkstemp's 0o600 made every artifact private to its owner whatever the umask)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp


def write_artifact(path: str | Path, manifest: Manifest, files: dict[str, bytes], signing_key: Any = None) -> Path:
    """Write the artifact atomically: a temp file beside `path`, then rename. `files` are the members
    other than the manifest; their checksums are recorded in the manifest, and the manifest's digest in
    it. With `signing_key` (trust.SigningKey) it is signed; without, unsigned (an earlier signature is
    dropped). The manifest is checked as the runtime will check it, so nothing unloadable is written.
    Sets `manifest.members`, `.digest` and `.signature`."""
    path = Path(path)
    manifest.members = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    manifest.digest = manifest.signature = None
    data = json.loads(json.dumps(manifest.to_json()))  # JSON types only: what a reader will see
    if signing_key is not None:
        data[schema.SIGNATURE] = signing_key.sign_manifest(data)
    manifest_bytes = schema.seal(data)
    data = schema.read_manifest(manifest_bytes, f"{path} (being written)")
    if WEIGHTS in files:
        _check_weights_fit(manifest, {WEIGHTS: (0, len(files[WEIGHTS]))}, path)
    manifest.digest, manifest.signature = data[schema.DIGEST], data.get(schema.SIGNATURE)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tarfile  # writing is the compiler's job: the runtime does not pay for this import

    fd, tmp = create_beside(path)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in [(MANIFEST, manifest_bytes), *files.items()]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class ArtifactFile:
    """An opened artifact: manifest parsed, members located (not yet verified).

    Each member is read into the process's own memory on first use (the weights into one 64-byte aligned
    buffer) and hashed there, so what is verified is what runs, and replacing or rewriting the file
    under a live session changes nothing in it. (Until issue 20 the file was mapped copy-on-write and
    the weights were arrays into the mapping: `cp other.fml live.fml` truncated the file under the
    session, whose next run died of SIGBUS, and a same-size overwrite silently changed its outputs.)"""

    def __init__(self, path: Path, manifest: Manifest, offsets: dict[str, tuple[int, int]],
                 data: dict[str, Any] | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.data = manifest.to_json() if data is None else data  # the manifest as read: what its digest covers
        self.offsets = offsets  # member -> (data offset in the file, size)
        self._members: dict[str, memoryview] = {}

    def _member(self, name: str) -> memoryview:
        view = self._members.get(name)
        if view is None:
            offset, size = self.offsets[name]
            buffer = _aligned_buffer(size) if name == WEIGHTS else bytearray(size)
            with open(self.path, "rb") as f:
                f.seek(offset)
                done = 0
                while done < size and (got := f.readinto(memoryview(buffer)[done:])):
                    done += got
            if done != size:
                raise ArtifactError(f"{self.path}: member '{name}' is truncated")
            view = self._members[name] = memoryview(buffer)
        return view

    def read_member(self, name: str) -> bytes:
        return bytes(self._member(name))

    def verify_checksums(self) -> None:
        """Hash every member against the manifest; raise on any mismatch or missing member."""
        for name, expected in self.manifest.members.items():
            if name not in self.offsets:
                raise ArtifactError(f"{self.path}: member '{name}' listed in the manifest is missing")
            if hashlib.sha256(self._member(name)).hexdigest() != expected:
                raise ArtifactError(
                    f"{self.path}: checksum mismatch in '{name}' (tampered or damaged); refusing to load it"
                )
        extra = set(self.offsets) - set(self.manifest.members) - {MANIFEST}
        if extra:
            raise ArtifactError(f"{self.path}: unexpected members not in the manifest: {', '.join(sorted(extra))}")

    def read_weights(self) -> list[np.ndarray]:
        """The weights as arrays into one 64-byte aligned buffer of this process's memory, holding the
        bytes `verify_checksums` hashed (writable: TVM's DLPack import wants writable arrays)."""
        if not self.manifest.weights:
            return []
        blob = self._member(WEIGHTS)
        arrays = []
        for w in self.manifest.weights:
            count = math.prod(w.shape)
            if not count:
                arrays.append(np.zeros(w.shape, w.dtype))
                continue
            try:
                arrays.append(np.frombuffer(blob, w.dtype, count, w.offset).reshape(w.shape))
            except ValueError:
                raise ArtifactError(f"{self.path}: weight '{w.name}' lies outside {WEIGHTS}") from None
        return arrays


def _aligned_buffer(size: int) -> np.ndarray:
    """`size` uninitialized bytes starting at a 64-byte aligned address (each weight's offset is a
    multiple of 64, so every weight is aligned as compiled kernels assume)."""
    raw = np.empty(size + _ALIGN, dtype=np.uint8)
    start = (-raw.__array_interface__["data"][0]) % _ALIGN
    return raw[start:start + size]


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
    if size > schema.MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: manifest.json is {size} bytes, more than any forgeml manifest "
                            f"({schema.MAX_MANIFEST_BYTES}); refusing to read it")
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    data = schema.read_manifest(raw, str(path))  # digest, canonical form and schema
    manifest = Manifest._from_valid(data)
    _check_weights_fit(manifest, offsets, path)
    return ArtifactFile(path, manifest, offsets, data)


def _check_weights_fit(manifest: Manifest, offsets: dict[str, tuple[int, int]], path: Path) -> None:
    """Every weight lies inside weights.bin as stored (its absence is verify_checksums' to report)."""
    if WEIGHTS not in offsets:
        return
    size = offsets[WEIGHTS][1]
    for i, w in enumerate(manifest.weights):
        if w.offset + w.nbytes > size:
            raise ArtifactError(f"{path}: manifest field 'weights[{i}].offset': weight '{w.name}' lies outside "
                                f"{WEIGHTS} (bytes {w.offset} to {w.offset + w.nbytes} of {size})")


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
