"""Signed artifacts (issue 20): ed25519 keys, `forgeml sign` / `compile --sign-key`, and loading with
trusted keys, which refuses an unsigned, foreign-signed or tampered artifact before any of its code runs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from artifacts import members_of, rewrite
from conftest import mlp_model, save

import forgeml
from forgeml.errors import ArtifactError, InvalidInput, UntrustedArtifact
from forgeml.runtime.artifact import open_artifact
from forgeml.runtime.trust import generate_keys, load_public_key, load_signing_key, sign_artifact

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(21).standard_normal((4, 16)).astype("float32")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """name -> (private.pem, public.pem, key id): the owner's key and an attacker's."""
    root = tmp_path_factory.mktemp("keys")
    return {name: generate_keys(root / name) for name in ("owner", "attacker")}


@pytest.fixture(scope="module")
def signed(compiled_mlp, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "signed.fml"
    sign_artifact(compiled_mlp[1], load_signing_key(keys["owner"][0], "release-ci"), out)
    return out


def test_keygen_writes_a_private_and_a_public_key(keys, tmp_path):
    private, public, key_id = keys["owner"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_public_key(public)[0] == key_id == load_signing_key(private).key_id
    assert key_id != keys["attacker"][2]
    shutil.copy(private, tmp_path / "private.pem")
    with pytest.raises(InvalidInput, match="already exists; refusing to overwrite a key"):
        generate_keys(tmp_path)
    assert not (tmp_path / "public.pem").exists()


def test_a_signed_artifact_loads_with_its_key(compiled_mlp, signed, keys):
    manifest = open_artifact(signed).manifest
    assert manifest.signature["signer"] == "release-ci" and manifest.signature["key_id"] == keys["owner"][2]
    assert manifest.members == open_artifact(compiled_mlp[1]).manifest.members  # the same library and weights
    expected = forgeml.load(compiled_mlp[1]).run({"x": X})["y"]
    for trusted in ([keys["owner"][1]], [keys["attacker"][1], keys["owner"][1]], str(keys["owner"][1])):
        np.testing.assert_array_equal(forgeml.load(signed, trusted_keys=trusted).run({"x": X})["y"], expected)
    np.testing.assert_array_equal(forgeml.load(signed).run({"x": X})["y"], expected)  # no keys: no check


def test_unsigned_and_foreign_signed_artifacts_are_refused(compiled_mlp, signed, keys):
    with pytest.raises(UntrustedArtifact, match="is not signed, and trusted keys were given"):
        forgeml.load(compiled_mlp[1], trusted_keys=[keys["owner"][1]])
    with pytest.raises(UntrustedArtifact, match="signed by 'release-ci' .* not among the 1 trusted key"):
        forgeml.load(signed, trusted_keys=[keys["attacker"][1]])


TAMPERING = {
    # edit of the manifest after signing; the digest (and the members' checksums) recomputed, as anyone can
    "weight offset": lambda m: m["weights"][1].update(offset=0),
    "input shape": lambda m: m["inputs"][0].update(shape=[1, 16]),
    "signer renamed": lambda m: m["signature"].update(signer="someone else"),
    "signature bit": lambda m: m["signature"].update(value=f"{int(m['signature']['value'][0], 16) ^ 1:x}"
                                                     + m["signature"]["value"][1:]),
    "verification record": lambda m: m["verification"].update(max_abs_error=0.0),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_after_signing_is_refused(signed, keys, tmp_path, case):
    bad = rewrite(signed, tmp_path / "bad.fml", edit=TAMPERING[case])
    with pytest.raises(UntrustedArtifact, match=r"by '(release-ci|someone else)' does not match the manifest"):
        forgeml.load(bad, trusted_keys=[keys["owner"][1]])


def _malicious_library(tmp_path: Path) -> bytes:
    """A shared library whose constructor writes the file named by $FORGEML_TEST_MARKER when loaded."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the malicious library")
    source = tmp_path / "evil.c"
    source.write_text('#include <stdio.h>\n#include <stdlib.h>\n'
                      '__attribute__((constructor)) static void evil(void) {\n'
                      '  FILE *f = fopen(getenv("FORGEML_TEST_MARKER"), "w");\n'
                      '  if (f) { fputs("ran", f); fclose(f); }\n}\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"), str(source)], check=True, timeout=120)
    return (tmp_path / "evil.so").read_bytes()


def test_a_malicious_library_never_runs_when_keys_are_given(signed, keys, tmp_path, monkeypatch):
    """Issue 20: a model.so with recomputed checksums was accepted and its constructor ran. With trusted keys
    it is refused before loading, whether the owner's signature is kept, stripped or replaced."""
    evil = {"model.so": _malicious_library(tmp_path)}
    marker = tmp_path / "constructor-ran"
    monkeypatch.setenv("FORGEML_TEST_MARKER", str(marker))
    kept = rewrite(signed, tmp_path / "kept.fml", members=evil)
    stripped = rewrite(signed, tmp_path / "stripped.fml", members=evil, edit=lambda m: m.pop("signature"))
    resigned = tmp_path / "resigned.fml"
    sign_artifact(stripped, load_signing_key(keys["attacker"][0], "release-ci"), resigned)
    for artifact, why in ((kept, "does not match the manifest"), (stripped, "is not signed"),
                          (resigned, "not among the 1 trusted key")):
        with pytest.raises(UntrustedArtifact, match=why):
            forgeml.load(artifact, trusted_keys=[keys["owner"][1]])
        assert not marker.exists(), f"{artifact.name}: the library's constructor ran"
    # the control: without trusted keys (checksums and digest are consistent) its constructor does run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", f"import forgeml; forgeml.load({str(resigned)!r})"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert marker.exists(), proc.stderr


def test_flips_in_a_signed_manifest_are_refused_with_keys(signed, keys, tmp_path):
    """Even where the digest is recomputed after a change, the signature refuses it; here, raw flips."""
    data = signed.read_bytes()
    raw = members_of(signed)["manifest.json"]
    start = data.index(raw)
    rng = np.random.default_rng(22)
    for n, position in enumerate(rng.integers(start, start + len(raw), 60)):
        flipped = bytearray(data)
        flipped[position] ^= int(rng.integers(1, 256))
        (tmp_path / f"f{n}.fml").write_bytes(flipped)
        with pytest.raises(ArtifactError) as caught:
            forgeml.load(tmp_path / f"f{n}.fml", trusted_keys=[keys["owner"][1]])
        assert "\n" not in str(caught.value)


def test_resigning_replaces_the_signature_and_refuses_damaged_artifacts(signed, keys, tmp_path):
    again = sign_artifact(signed, load_signing_key(keys["attacker"][0], "mirror"), tmp_path / "again.fml")
    assert again.signature["signer"] == "mirror"
    forgeml.load(tmp_path / "again.fml", trusted_keys=[keys["attacker"][1]])
    damaged = rewrite(signed, tmp_path / "damaged.fml", rehash=False,
                      members={"weights.bin": members_of(signed)["weights.bin"][:-4] + b"\1\2\3\4"})
    with pytest.raises(ArtifactError, match="checksum mismatch in 'weights.bin'"):
        sign_artifact(damaged, load_signing_key(keys["owner"][0]), tmp_path / "out.fml")
    assert not (tmp_path / "out.fml").exists()


def test_bad_key_files_are_one_line_errors(keys, compiled_mlp, tmp_path):
    private, public, _ = keys["owner"]
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(InvalidInput, match="private key not found"):
        load_signing_key(tmp_path / "missing.pem")
    with pytest.raises(InvalidInput, match="is not a private key in PEM format"):
        load_signing_key(public)
    with pytest.raises(InvalidInput, match="trusted key .*junk.pem is not a public key in PEM format"):
        forgeml.load(compiled_mlp[1], trusted_keys=[tmp_path / "junk.pem"])
    with pytest.raises(InvalidInput, match="trusted key .*private.pem is not a public key"):
        forgeml.load(compiled_mlp[1], trusted_keys=[private])
    with pytest.raises(InvalidInput, match="trusted_keys is empty"):
        forgeml.load(compiled_mlp[1], trusted_keys=[])


def test_compile_with_a_bad_key_fails_before_compiling(tmp_path):
    onnx_path = save(mlp_model(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match="private key not found"):
        forgeml.compile_model(onnx_path, tmp_path / "m.fml", sign_key=tmp_path / "missing.pem")
    assert not (tmp_path / "m.fml").exists()


def test_loading_without_keys_does_not_import_cryptography(signed):
    code = (f"import sys, forgeml; forgeml.load({str(signed)!r}); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cryptography'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", "import json; " + code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "forgeml.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_keygen_compile_signed_inspect_and_run_with_trusted_keys(tmp_path):
    onnx_path = save(mlp_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    assert _cli("keygen", tmp_path / "keys").returncode == 0
    assert _cli("keygen", tmp_path / "other").returncode == 0
    proc = _cli("compile", onnx_path, "-o", tmp_path / "m.fml", "--sign-key", tmp_path / "keys/private.pem",
                "--signer", "release-ci")
    assert proc.returncode == 0 and "signed by release-ci" in proc.stderr, proc.stderr
    assert "signature    ed25519 by release-ci" in _cli("inspect", tmp_path / "m.fml").stdout
    proc = _cli("inspect", tmp_path / "m.fml", "--trusted-key", tmp_path / "keys/public.pem")
    assert "(checked: a trusted key signed it)" in proc.stdout, proc.stderr
    assert _cli("inspect", tmp_path / "m.fml", "--trusted-key", tmp_path / "other/public.pem").returncode == 2
    run = ("run", tmp_path / "m.fml", "-i", f"x={tmp_path / 'x.npy'}", "-o", tmp_path / "y.npz")
    assert _cli(*run, "--trusted-key", tmp_path / "keys/public.pem").returncode == 0
    proc = _cli(*run, "--trusted-key", tmp_path / "other/public.pem")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not among the 1 trusted key" in lines[0], proc.stderr
    assert _cli("sign", tmp_path / "m.fml", "--key", tmp_path / "other/private.pem").returncode == 0  # in place
    assert "ed25519 by" in _cli("inspect", tmp_path / "m.fml").stdout
    assert _cli(*run, "--trusted-key", tmp_path / "other/public.pem").returncode == 0
