"""The persistent tuning database: one per target in the user cache ($FORGEML_CACHE, default
~/.cache/forgeml), shared by every model, with the rule schedules' measured latencies beside it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from forgeml.compiler.tensor_intrinsics import register_tensor_intrinsics


def cache_dir() -> Path:
    return Path(os.environ.get("FORGEML_CACHE", "~/.cache/forgeml")).expanduser()


# Limits MetaSchedule's GPU rules read from the target (TVM's own "nvidia/..." tags carry them; a bare
# {"kind": "cuda", "arch": ...} does not, and AutoBind then refuses to start).
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
                "registers_per_block": 65536, "thread_warp_size": 32}


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """The target as tuning sees it: CUDA targets get the GPU limits MetaSchedule needs (idempotent)."""
    if target.kind.name != "cuda" or all(k in target.attrs for k in _CUDA_LIMITS):
        return target
    config = dict(target.export())
    for key, value in _CUDA_LIMITS.items():
        config.setdefault(key, value)
    if target.host is not None:
        config["host"] = dict(target.host.export())
    return tvm.target.Target(config)


def target_key(target: tvm.target.Target) -> str:
    """A readable, stable key for a target: kind-mcpu-cores-hash. A GPU target's key leaves out its host
    CPU (the host code only launches kernels), so CUDA records stay valid on any host machine."""
    target = tuning_target(target)
    config = {k: str(v) for k, v in sorted(dict(target.export()).items())
              if not (k == "host" and target.kind.name == "cuda")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    mcpu = str(target.attrs.get("mcpu", target.attrs.get("arch", "generic")))
    cores = target.attrs.get("num-cores", "")
    return f"{target.kind.name}-{mcpu}{f'-{cores}c' if cores else ''}-{digest}"


def database_dir(target: tvm.target.Target) -> Path:
    return cache_dir() / "tuning" / target_key(target)


def open_database(target: tvm.target.Target) -> ms.database.JSONDatabase:
    """The target's persistent database. Its records' traces may name tensor intrinsics (wmma on
    CUDA, NEON on ARM), which must be registered before they are read."""
    register_tensor_intrinsics()
    path = database_dir(target)
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(path / "workloads.json"),
                                    path_tuning_record=str(path / "records.json"), allow_missing=True)


def has_records(target: tvm.target.Target) -> bool:
    """Whether this target's database holds any tuning record (then compiles consult it)."""
    records = database_dir(target) / "records.json"
    return records.is_file() and records.stat().st_size > 0


def read_rule_latencies(target: tvm.target.Target) -> dict[str, float | None]:
    path = database_dir(target) / "rule_latency.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_rule_latencies(target: tvm.target.Target, latencies: dict[str, float | None]) -> None:
    """Merge `latencies` into the target's cached rule latencies (atomically)."""
    path = database_dir(target) / "rule_latency.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_rule_latencies(target), **latencies}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, path)
