"""One integrity root: the manifest's digest covers every byte of it (offsets, dtypes, shapes, the member
checksums), every field is checked against the schema before use, and random damage anywhere in an
artifact is refused cleanly or changes nothing (issue 20)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from artifacts import members_of, rewrite, write_tar

import forgeml
from forgeml.errors import ArtifactError, ForgeError
from forgeml.runtime.artifact import open_artifact
from forgeml.runtime.schema import canonical_json, seal

X = np.random.default_rng(20).standard_normal((4, 16)).astype("float32")


def _manifest_span(path: Path) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        member = tar.getmember("manifest.json")
        return member.offset_data, member.size


def test_a_flipped_offset_digit_is_refused(compiled_mlp, tmp_path):
    """Before: the manifest was outside the checksums; this loaded and ran on the wrong bytes."""
    data = bytearray(compiled_mlp[1].read_bytes())
    start, size = _manifest_span(compiled_mlp[1])
    manifest = data[start:start + size]
    found = re.search(rb'"offset":\s*[1-9]\d*', bytes(manifest))  # a weight after the first
    last_digit = start + found.end() - 1
    data[last_digit] = ord("0") + (data[last_digit] - ord("0") + 4) % 10
    (tmp_path / "bad.fml").write_bytes(data)
    with pytest.raises(ArtifactError, match="manifest.json does not match its digest"):
        forgeml.load(tmp_path / "bad.fml")


def test_the_digest_covers_the_member_checksums(compiled_mlp, tmp_path):
    """A member replaced with its checksum updated but the digest left alone is refused by the digest."""
    lib = members_of(compiled_mlp[1])["model.so"]
    bad = rewrite(compiled_mlp[1], tmp_path / "bad.fml", members={"model.so": lib + b"\0"}, reseal=False)
    with pytest.raises(ArtifactError, match="manifest.json does not match its digest"):
        forgeml.load(bad)


def test_an_edited_but_equivalent_manifest_is_refused(compiled_mlp, tmp_path):
    """Whitespace or key order changes nothing a parser sees; still, only the bytes forgeml wrote load."""
    files = members_of(compiled_mlp[1])
    data = json.loads(files["manifest.json"])
    files["manifest.json"] = json.dumps(data, indent=2, sort_keys=True).encode()
    with pytest.raises(ArtifactError, match="not in the form forgeml writes"):
        forgeml.load(write_tar(tmp_path / "bad.fml", files))


def _weights0(m, **fields):
    m["weights"][0].update(fields)


# (edit of the manifest's JSON, field the error must name, words it must say). The digest is recomputed
# after each edit, as any tool (or attacker) can: the schema must catch what the digest cannot.
MALFORMED = {
    "dtype float33": (lambda m: m["inputs"][0].update(dtype="float33"), "inputs[0].dtype", "float33"),
    "weight dtype float33": (lambda m: _weights0(m, dtype="float33"), "weights[0].dtype", "float33"),
    "weight shape off its size": (lambda m: _weights0(m, shape=[16, 33]), "weights[0].shape", "nbytes"),
    "input shape of strings": (lambda m: m["inputs"][0].update(shape=[4, "16"]), "inputs[0].shape[1]", "integer"),
    "input shape a number": (lambda m: m["inputs"][0].update(shape=4), "inputs[0].shape", "array"),
    "negative dimension": (lambda m: m["outputs"][0].update(shape=[4, -2]), "outputs[0].shape[1]", "at least -1"),
    "members an empty list": (lambda m: m.update(members=[]), "members", "an object, not an array"),
    "members empty": (lambda m: m.update(members={}), "members", "empty"),
    "member checksum not hex": (lambda m: m["members"].update({"model.so": "zz"}), "members.model.so", "sha256"),
    "target a string": (lambda m: m.update(target="x86-64"), "target", "an object, not a string"),
    "target without arch": (lambda m: m["target"].pop("arch"), "target.arch", "missing"),
    "cpu features not a list": (lambda m: m["target"].update(cpu_features="avx2"), "target.cpu_features", "array"),
    "offset past int64": (lambda m: _weights0(m, offset=1 << 70), "weights[0].offset", "64-bit"),
    "offset a string": (lambda m: _weights0(m, offset="0"), "weights[0].offset", "integer"),
    "offset unaligned": (lambda m: _weights0(m, offset=4), "weights[0].offset", "multiple of 64"),
    "offset negative": (lambda m: _weights0(m, offset=-64), "weights[0].offset", "at least 0"),
    "offset past weights.bin": (lambda m: _weights0(m, offset=1 << 40), "weights[0].offset", "outside weights.bin"),
    "nbytes a float": (lambda m: _weights0(m, nbytes=2048.0), "weights[0].nbytes", "integer"),
    "weight entry a list": (lambda m: m["weights"].__setitem__(0, [1, 2]), "weights[0]", "an object"),
    "weight field unknown": (lambda m: _weights0(m, stride=4), "weights[0].stride", "not part of the format"),
    "library not a member": (lambda m: m.update(library="other.so"), "library", "not among the members"),
    "no outputs": (lambda m: m.update(outputs=[]), "outputs", "empty"),
    "output names repeat": (lambda m: m["outputs"].append(dict(m["outputs"][0])), "outputs[1].name", "repeats"),
    "range reversed": (lambda m: m["inputs"][0].update(range=[5, 1]), "inputs[0].range", "empty"),
    "range of three": (lambda m: m["inputs"][0].update(range=[0, 1, 2]), "inputs[0].range", "[low, high]"),
    "output kind unknown": (lambda m: m["outputs"][0].update(kind="list"), "outputs[0].kind", "'sequence'"),
    "sequence with a shape": (lambda m: m["outputs"][0].update(kind="sequence"), "outputs[0].shape",
                              "not part of the format"),
    "sequence input": (lambda m: m["inputs"][0].update(kind="sequence"), "inputs[0].kind", "not part of an input"),
    "sequence kind a number": (lambda m: m["outputs"][0].update(kind=1), "outputs[0].kind", "a string"),
    "verification error a string": (lambda m: m["verification"].update(max_abs_error="small"),
                                    "verification.max_abs_error", "a number"),
    "versions not strings": (lambda m: m["versions"].update(tvm=27), "versions.tvm", "a string"),
    "unknown top-level field": (lambda m: m.update(extra=1), "extra", "not part of the format"),
    "format_version a string": (lambda m: m.update(format_version="2"), "format_version", "integer"),
    "dynamic axis past the rank": (lambda m: m["inputs"][0].update(
        dynamic=[{"axis": 5, "variable": "batch", "min": 1, "max": 8}]), "inputs[0].dynamic[0].axis", "axes"),
    "dynamic range reversed": (lambda m: m["inputs"][0].update(
        dynamic=[{"axis": 0, "variable": "batch", "min": 9, "max": 8}]), "inputs[0].dynamic[0]", "empty range"),
    "function weight past the weights": (lambda m: m.update(
        functions=[{"name": "main", "dimensions": None, "weights": [99]}]), "functions[0].weights[0]", "weights"),
    "function dimensions a list": (lambda m: m.update(
        functions=[{"name": "main", "dimensions": [1], "weights": []}]), "functions[0].dimensions", "an object"),
    "signature of another algorithm": (lambda m: m.update(signature={"algorithm": "rsa", "key_id": "", "signer": "",
                                                                     "value": ""}), "signature.algorithm", "ed25519"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_field_is_one_line_naming_it(compiled_mlp, tmp_path, case):
    """Before: TypeError/AttributeError ('internal error', exit 1) or a model running on nonsense."""
    edit, field, words = MALFORMED[case]
    bad = rewrite(compiled_mlp[1], tmp_path / "bad.fml", edit=edit)
    for load in (forgeml.load, open_artifact):
        with pytest.raises(ArtifactError) as caught:
            load(bad)
        message = str(caught.value)
        assert f"manifest field '{field}'" in message and words in message and "\n" not in message, message


def test_malformed_manifests_exit_2_from_the_cli(compiled_mlp, tmp_path):
    """`forgeml inspect` printed 'internal error: AttributeError' (exit 1) for a string target."""
    bad = rewrite(compiled_mlp[1], tmp_path / "bad.fml", edit=lambda m: m.update(target="x86-64"))
    for command in ("inspect", "run"):
        proc = subprocess.run([sys.executable, "-m", "forgeml.cli", command, str(bad)], capture_output=True,
                              text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "manifest field 'target'" in lines[0], proc.stderr


def test_format_1_artifacts_are_refused_with_a_rebuild_message(compiled_mlp, tmp_path):
    files = members_of(compiled_mlp[1])
    manifest = json.loads(files["manifest.json"])
    manifest.update(format_version=1)
    manifest.pop("digest")
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()  # as format 1 wrote it
    with pytest.raises(ArtifactError, match=r"format 1, whose manifest has no digest.*rebuild it with `forgeml"):
        forgeml.load(write_tar(tmp_path / "old.fml", files))


def test_the_manifest_is_written_canonical_and_sealed(compiled_mlp):
    raw = members_of(compiled_mlp[1])["manifest.json"]
    data = json.loads(raw)
    assert raw == canonical_json(data) == seal(data)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", data["digest"])
    assert open_artifact(compiled_mlp[1]).manifest.digest == data["digest"]


def _meaningful_bytes(path: Path) -> np.ndarray:
    """A mask of the bytes that carry meaning: tar headers (less their checksum field, whose bytes after
    the NUL and leading blanks parsers ignore) and member data; the rest is padding."""
    size = path.stat().st_size
    mask = np.zeros(size, bool)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            header = member.offset
            mask[header:header + 512] = True
            mask[header + 148:header + 156] = False
            mask[member.offset_data:member.offset_data + member.size] = True
    return mask


def _flip_and_load(original: bytes, position: int, xor: int, path: Path, expected: np.ndarray) -> bool:
    """Load `original` with one byte changed: True if it loaded (then its outputs must be exact), False if
    refused (then with one line of a ForgeError); any other exception fails the test."""
    data = bytearray(original)
    data[position] ^= xor
    path.write_bytes(data)
    try:
        session = forgeml.load(path)
    except ForgeError as e:
        assert str(e) and "\n" not in str(e), (position, str(e))
        return False
    finally:
        path.unlink()
    np.testing.assert_array_equal(session.run({"x": X})["y"], expected, err_msg=f"byte {position} ^ {xor}")
    return True


def test_random_byte_flips_anywhere_are_refused_or_change_nothing(compiled_mlp, tmp_path):
    """Flips anywhere, in the manifest more densely (small, and where damage was silent before), and in
    the tar headers: a clean refusal every time, except in padding, where outputs must stay exact."""
    artifact = compiled_mlp[1]
    original = artifact.read_bytes()
    expected = forgeml.load(artifact).run({"x": X})["y"]
    meaningful = _meaningful_bytes(artifact)
    start, size = _manifest_span(artifact)
    rng = np.random.default_rng(2020)
    positions = [*rng.integers(0, len(original), 400), *rng.integers(start, start + size, 300),
                 *[h + int(o) for h in (0, start + size + (-size) % 512) for o in rng.integers(0, 512, 50)]]
    loaded = []
    for n, position in enumerate(positions):
        if _flip_and_load(original, int(position), int(rng.integers(1, 256)), tmp_path / f"flip{n}.fml", expected):
            loaded.append(int(position))
    assert not [p for p in loaded if meaningful[p]], "a flip in a header or member loaded"
    assert len(loaded) < len(positions) // 4
