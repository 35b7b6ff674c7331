"""Artifact surgery for tests: what an attacker or a buggy tool can do to a .fml file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgeml.runtime.schema import canonical_json, seal


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any] | None = None,
            members: dict[str, bytes] | None = None, rehash: bool = True, reseal: bool = True) -> Path:
    """A copy of `src` with members replaced, the manifest edited, then (as anyone can) the member
    checksums (`rehash`) and the manifest's digest (`reseal`) recomputed. The signature is kept as is."""
    files = members_of(src)
    manifest = json.loads(files.pop("manifest.json"))
    files.update(members or {})
    if rehash:
        manifest["members"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    if edit is not None:
        edit(manifest)
    raw = seal(manifest) if reseal else canonical_json(manifest)  # not resealed: the old digest stays
    return write_tar(dst, {"manifest.json": raw, **files})
