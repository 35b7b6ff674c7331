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
import math
import mmap
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from forgeml.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
_ALIGN = 64

# NamedTuples and plain classes, not dataclasses: each dataclass costs ~1.5 ms to create at import,
# which every process that loads a model pays.


class TensorSpec(NamedTuple):
    """A model input or output: name, static shape and numpy dtype name; for an integer input that
    indexes a tensor (Gather's indices), the values it may take (`valid_range`, inclusive): the
    runtime refuses others, since compiled gathers do not check bounds."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    valid_range: tuple[int, int] | None = None
    dynamic: tuple[DynamicDim, ...] = ()  # the axes that vary at run time (their `shape` entry is -1)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.valid_range is not None:
            d["range"] = list(self.valid_range)
        if self.dynamic:
            d["dynamic"] = [dim._asdict() for dim in self.dynamic]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        bounds = d.get("range")
        dynamic = tuple(DynamicDim(int(x["axis"]), str(x["variable"]), int(x["min"]), int(x["max"]))
                        for x in d.get("dynamic", ()))
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"],
                   (int(bounds[0]), int(bounds[1])) if bounds is not None else None, dynamic)

    def describe(self) -> str:
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
    """What an artifact holds and how it was made. Stored as manifest.json."""

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

        out = copy.deepcopy({**vars(self), "inputs": [t.to_json() for t in self.inputs],
                             "outputs": [t.to_json() for t in self.outputs],
                             "weights": [w._asdict() | {"shape": list(w.shape)} for w in self.weights]})
        if self.functions is None:  # a static model: `main` with every weight, as before dynamic shapes
            del out["functions"]
        return out

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
                functions=d.get("functions"),
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


class ArtifactFile:
    """An opened artifact: manifest parsed, members located (not yet verified).

    The file is mapped once, private and copy-on-write: members are hashed from the mapping without a
    copy, and the weights are arrays into it."""

    def __init__(self, path: Path, manifest: Manifest, offsets: dict[str, tuple[int, int]]) -> None:
        self.path = path
        self.manifest = manifest
        self.offsets = offsets  # member -> (data offset in the file, size)
        self._mapping: mmap.mmap | None = None

    def _member(self, name: str) -> memoryview:
        if self._mapping is None:
            with open(self.path, "rb") as f:
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        offset, size = self.offsets[name]
        view = memoryview(self._mapping)[offset:offset + size]
        if len(view) != size:
            raise ArtifactError(f"{self.path}: member '{name}' is truncated")
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

    def map_weights(self) -> list[np.ndarray]:
        """Weights as copy-on-write memory maps into the artifact file (64-byte aligned)."""
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
