"""The manifest's integrity root and its schema.

manifest.json is written in one canonical form (sorted keys, compact, ASCII: json's C encoder) and carries
`digest`: the sha256 of that form without the digest itself. The member checksums are inside it, so
that one digest covers every byte of the manifest and, through the checksums, of every member: an
edited offset, dtype or shape changes it. A signature (`signature`, see trust.py) signs the manifest
without `digest` and `signature`; the digest then covers the signature too.

The digest proves integrity, not origin: anyone can recompute it. So every field is also checked
against the schema before use (types, dtype names, shapes, weight sizes, members), and each malformed
field is reported in one line naming it.

Standard library only (the runtime runs on devices with numpy and the TVM runtime alone).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from forgeml.errors import ArtifactError

FORMAT_VERSION = 2  # 2: manifest digest and optional signature; 1 (no digest) is refused: rebuild it
DIGEST = "digest"
SIGNATURE = "signature"
MAX_MANIFEST_BYTES = 16 << 20  # far above any real one (~100 bytes per weight tensor)
WEIGHT_ALIGN = 64
_INT64 = 1 << 63  # integers (sizes, offsets, index ranges) must fit an int64

_SHA256 = re.compile(r"[0-9a-f]{64}")
# numpy's names, then ml_dtypes' (bfloat16, float8_*, int4, ...: numpy knows them only once ml_dtypes
# is imported, which the runtime does only for models that use them)
DTYPE_SIZES: dict[str, int] = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4,
    "uint64": 8, "float16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
    "bfloat16": 2, "float8_e3m4": 1, "float8_e4m3": 1, "float8_e4m3b11fnuz": 1, "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn": 1,
    "float6_e2m3fn": 1, "float6_e3m2fn": 1, "int2": 1, "int4": 1, "uint2": 1, "uint4": 1,
}


def canonical_json(data: Any) -> bytes:
    """The one byte form forgeml writes a manifest in (what the digest and signatures cover)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of the canonical manifest without its `digest` field: the artifact's integrity root."""
    body = {k: v for k, v in data.items() if k != DIGEST}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


def body_sha256(data: dict[str, Any]) -> str:
    """sha256 of the canonical manifest without `digest` and `signature`: what a signature signs."""
    body = {k: v for k, v in data.items() if k not in (DIGEST, SIGNATURE)}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(data: dict[str, Any]) -> bytes:
    """manifest.json's bytes for `data` (JSON types only), with its digest set."""
    data = {k: v for k, v in data.items() if k != DIGEST}
    data[DIGEST] = manifest_digest(data)
    return canonical_json(data)


def read_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse manifest.json's bytes, check format, digest and canonical form, then the schema."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{where}: manifest.json is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: manifest.json is not a JSON object")
    check_format_version(data, where)
    digest = data.get(DIGEST)
    if not isinstance(digest, str):
        raise ArtifactError(f"{where}: manifest field '{DIGEST}' must be a string, not {_ARTICLE[_type(digest)]}")
    if digest != manifest_digest(data):
        raise ArtifactError(f"{where}: manifest.json does not match its digest (tampered or damaged); "
                            "refusing to load it")
    if canonical_json(data) != raw:
        raise ArtifactError(f"{where}: manifest.json is not in the form forgeml writes (edited or damaged); "
                            "refusing to load it")
    validate(data, where)
    return data


def check_format_version(data: dict[str, Any], where: str) -> None:
    version = data.get("format_version")
    if type(version) is not int:
        raise ArtifactError(f"{where}: manifest field 'format_version' must be an integer, "
                            f"not {_ARTICLE[_type(version)]}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{where} has artifact format {version}, newer than this runtime understands "
                            f"({FORMAT_VERSION}); upgrade forgeml to load it")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{where} has artifact format {version}, whose manifest has no digest of its own; "
                            "rebuild it with `forgeml compile`")


class _Checker:
    """Typed checks that raise one ArtifactError naming the field (`weights[3].offset`)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> None:
        raise ArtifactError(f"{self.where}: manifest field '{field}' {problem}")

    def of(self, value: Any, field: str, *types: str) -> Any:
        kind = _TYPES.get(type(value), "other")
        if kind not in types and not (kind == "integer" and "number" in types):
            self.fail(field, f"must be {' or '.join(_ARTICLE[t] for t in types)}, not {_ARTICLE[kind]}")
        return value

    def record(self, data: Any, field: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
               closed: bool = True) -> dict[str, Any]:
        """A JSON object with these keys (`closed`: no others)."""
        self.of(data, field, "object")
        for key in required:
            if key not in data:
                self.fail(f"{field}.{key}" if field else key, "is missing")
        if closed and len(data) > len(required):  # (all required keys are there: only then can others be)
            unknown = sorted(set(data) - set(required) - set(optional))
            if unknown:
                self.fail(f"{field}.{unknown[0]}" if field else unknown[0], "is not part of the format")
        return data

    def integer(self, value: Any, field: str, low: int | None = None) -> int:
        if type(value) is int and (low is None or value >= low) and -_INT64 <= value < _INT64:
            return value
        self.of(value, field, "integer")
        if low is not None and value < low:
            self.fail(field, f"must be at least {low}, not {value}")
        if not -_INT64 <= value < _INT64:
            self.fail(field, "does not fit a 64-bit integer")
        return value

    def string_map(self, value: Any, field: str) -> None:
        for key, item in self.of(value, field, "object").items():
            self.of(item, f"{field}.{key}", "string")

    def dtype(self, value: Any, field: str) -> str:
        self.of(value, field, "string")
        if value not in DTYPE_SIZES:
            self.fail(field, f"names no dtype forgeml knows: '{value[:40]}'")
        return value

    def shape(self, value: Any, field: str, low: int) -> tuple[int, ...]:
        if type(value) is list and all(type(dim) is int and low <= dim < _INT64 for dim in value):
            return tuple(value)
        self.of(value, field, "array")
        for i, dim in enumerate(value):
            self.integer(dim, f"{field}[{i}]", low)
        return tuple(value)


_ARTICLE = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
            "number": "a number", "boolean": "a boolean", "null": "null",
            "other": "a non-JSON value"}


_TYPES = {bool: "boolean", int: "integer", float: "number", dict: "object", list: "array", str: "string",
          type(None): "null"}


def _type(value: Any) -> str:
    """The JSON type of a parsed value."""
    return _TYPES.get(type(value), "other")


_TOP_REQUIRED = ("format_version", DIGEST, "target", "inputs", "outputs", "library", "members")
_TOP_OPTIONAL = ("weights", "source", "compile_options", "tuning", "verification", "versions", SIGNATURE,
                 "functions")


def validate(data: dict[str, Any], where: str) -> None:
    """Check every field the runtime, `inspect` and the tools read; raise on the first bad one."""
    c = _Checker(where)
    c.record(data, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    check_format_version(data, where)
    _check_target(c, data["target"])
    for role in ("inputs", "outputs"):
        names = set()
        for i, spec in enumerate(c.of(data[role], role, "array")):
            names.add(_check_tensor(c, spec, f"{role}[{i}]", sequence_ok=role == "outputs"))
            if len(names) != i + 1:
                c.fail(f"{role}[{i}].name", f"repeats '{spec['name']}'")
    if not data["outputs"]:
        c.fail("outputs", "is empty (a model has at least one output)")
    members = c.of(data["members"], "members", "object")
    if not members:
        c.fail("members", "is empty (an artifact holds at least its library)")
    for name, digest in members.items():
        if not name or name == "manifest.json":
            c.fail(f"members.{name}", "is not a member name")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            c.fail(f"members.{name}", "must be a sha256 (64 lowercase hex digits)")
    if c.of(data["library"], "library", "string") not in members:
        c.fail("library", f"names '{data['library'][:60]}', which is not among the members")
    weights = c.of(data.get("weights", []), "weights", "array")
    for i, entry in enumerate(weights):
        _check_weight(c, entry, f"weights[{i}]")
    if weights and "weights.bin" not in members:
        c.fail("members", "lacks weights.bin, which the weights are in")
    _check_sections(c, data)
    if "functions" in data:
        _check_functions(c, data["functions"], len(weights), members)
    if SIGNATURE in data:
        check_signature_record(c, data[SIGNATURE])


def _check_target(c: _Checker, target: Any) -> None:
    c.record(target, "target", ("name", "arch", "device"), closed=False)
    for key in ("name", "arch", "device"):
        c.of(target[key], f"target.{key}", "string")
    if "target" in target:
        c.of(target["target"], "target.target", "object", "string")
    for i, flag in enumerate(c.of(target.get("cpu_features", []), "target.cpu_features", "array")):
        c.of(flag, f"target.cpu_features[{i}]", "string")


def _check_tensor(c: _Checker, spec: Any, field: str, sequence_ok: bool) -> str:
    if isinstance(spec, dict) and "kind" in spec:  # a sequence output: name, kind, element dtype
        kind = c.of(spec["kind"], f"{field}.kind", "string")
        if kind != "sequence" or not sequence_ok:
            c.fail(f"{field}.kind", f"must be 'sequence' on an output (inputs are tensors), not '{kind[:40]}'"
                   if sequence_ok else "is not part of an input (inputs are tensors)")
        c.record(spec, field, ("name", "kind", "dtype"))
        c.of(spec["name"], f"{field}.name", "string")
        c.dtype(spec["dtype"], f"{field}.dtype")
        return spec["name"]
    c.record(spec, field, ("name", "shape", "dtype"), ("range", "dynamic"))
    c.of(spec["name"], f"{field}.name", "string")
    shape = c.shape(spec["shape"], f"{field}.shape", -1)  # -1: a dimension known only at run time
    for i, dim in enumerate(c.of(spec.get("dynamic", []), f"{field}.dynamic", "array")):
        where = f"{field}.dynamic[{i}]"
        c.record(dim, where, ("axis", "variable", "min", "max"))
        axis = c.integer(dim["axis"], f"{where}.axis", 0)
        if axis >= len(shape):
            c.fail(f"{where}.axis", f"is {axis}, but the input has {len(shape)} axes")
        c.of(dim["variable"], f"{where}.variable", "string")
        low, high = c.integer(dim["min"], f"{where}.min", 0), c.integer(dim["max"], f"{where}.max", 0)
        if low > high:
            c.fail(where, f"has an empty range {low}..{high}")
    c.dtype(spec["dtype"], f"{field}.dtype")
    if "range" in spec:
        bounds = c.of(spec["range"], f"{field}.range", "array")
        if len(bounds) != 2:
            c.fail(f"{field}.range", f"must be [low, high], not {len(bounds)} numbers")
        low, high = (c.integer(b, f"{field}.range[{n}]") for n, b in enumerate(bounds))
        if low > high:
            c.fail(f"{field}.range", f"is empty ([{low}, {high}])")
    return spec["name"]


def _check_functions(c: _Checker, functions: Any, n_weights: int, members: dict[str, Any]) -> None:
    """Dynamic shapes: the VM functions (the symbolic `main`, dimensions null, and static buckets with
    their dimension sizes), each with the indices of its weights."""
    for i, entry in enumerate(c.of(functions, "functions", "array")):
        field = f"functions[{i}]"
        c.record(entry, field, ("name", "dimensions", "weights"), closed=False)
        c.of(entry["name"], f"{field}.name", "string")
        if "library" in entry and c.of(entry["library"], f"{field}.library", "string") not in members:
            c.fail(f"{field}.library", f"names '{entry['library'][:60]}', which is not among the members")
        sizes = c.of(entry["dimensions"], f"{field}.dimensions", "object", "null")
        for variable, size in (sizes or {}).items():
            c.integer(size, f"{field}.dimensions.{variable}", 0)
        for n, index in enumerate(c.of(entry["weights"], f"{field}.weights", "array")):
            if c.integer(index, f"{field}.weights[{n}]", 0) >= n_weights:
                c.fail(f"{field}.weights[{n}]", f"is {index}, but the manifest has {n_weights} weights")


def _check_weight(c: _Checker, entry: Any, field: str) -> None:
    c.record(entry, field, ("name", "shape", "dtype", "offset", "nbytes"))
    c.of(entry["name"], f"{field}.name", "string")
    shape = c.shape(entry["shape"], f"{field}.shape", 0)
    dtype = c.dtype(entry["dtype"], f"{field}.dtype")
    offset = c.integer(entry["offset"], f"{field}.offset", 0)
    nbytes = c.integer(entry["nbytes"], f"{field}.nbytes", 0)
    if offset % WEIGHT_ALIGN:
        c.fail(f"{field}.offset", f"must be a multiple of {WEIGHT_ALIGN}, not {offset}")
    if math.prod(shape) * DTYPE_SIZES[dtype] != nbytes:
        c.fail(f"{field}.shape", f"{list(shape)} of {dtype} is {math.prod(shape) * DTYPE_SIZES[dtype]} bytes, "
               f"but nbytes is {nbytes}")


def _check_sections(c: _Checker, data: dict[str, Any]) -> None:
    """The free-form sections are objects; the fields tools read out of them have their types."""
    for section in ("source", "compile_options", "tuning", "verification", "versions"):
        c.of(data.get(section, {}), section, "object")
    c.string_map(data.get("versions", {}), "versions")
    source = data.get("source", {})
    for key in ("file", "path", "sha256", "format"):
        if key in source:
            c.of(source[key], f"source.{key}", "string")
    if "opset" in source:
        c.integer(source["opset"], "source.opset")
    verification = data.get("verification", {})
    for key in ("max_abs_error", "max_rel_error", "tolerance"):
        if key in verification:
            c.of(verification[key], f"verification.{key}", "number")
    for key, kinds in (("passed", ("boolean",)), ("reference", ("string",)), ("skipped", ("string", "null")),
                       ("seed", ("integer",))):
        if key in verification:
            c.of(verification[key], f"verification.{key}", *kinds)


def check_signature_record(c: _Checker, record: Any) -> None:
    c.record(record, SIGNATURE, ("algorithm", "key_id", "signer", "value"))
    if record["algorithm"] != "ed25519":
        c.fail(f"{SIGNATURE}.algorithm", f"must be 'ed25519', not {str(record['algorithm'])[:40]!r}")
    key_id = c.of(record["key_id"], f"{SIGNATURE}.key_id", "string")
    if not key_id.startswith("sha256:") or not _SHA256.fullmatch(key_id[7:]):
        c.fail(f"{SIGNATURE}.key_id", "must be 'sha256:' and 64 lowercase hex digits")
    c.of(record["signer"], f"{SIGNATURE}.signer", "string")
    value = c.of(record["value"], f"{SIGNATURE}.value", "string")
    if not re.fullmatch(r"[0-9a-f]{128}", value):
        c.fail(f"{SIGNATURE}.value", "must be an ed25519 signature (128 lowercase hex digits)")
