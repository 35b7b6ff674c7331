"""Target presets by name. Adding a target is adding one entry to PRESETS.

A TargetSpec is plain data: the TVM target dictionary, the cross compiler that links the
artifact, and the architecture the runtime must run on. `mcpu: "host"` means "the CPU this
compile runs on" and is resolved at compile time.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

from forgeml.errors import InvalidInput
from forgeml.targets.host import detect_host

_AARCH64_GCC = "aarch64-linux-gnu-g++"
_RISCV64_GCC = "riscv64-linux-gnu-g++"
_CROSS = {"aarch64": (_AARCH64_GCC, ("g++-aarch64-linux-gnu",)), "riscv64": (_RISCV64_GCC, ("g++-riscv64-linux-gnu",))}
# /proc/cpuinfo flags that code for an LLVM cpu uses: running it without them dies of SIGILL.
_MCPU_FEATURES = {
    "haswell": ("avx", "avx2", "fma"),
    "skylake-avx512": ("avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
}


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    target: dict[str, Any]  # TVM target dict; "mcpu": "host" is filled in from the detected CPU
    arch: str  # machine the artifact's library runs on: x86_64, aarch64, riscv64
    device: str = "cpu"  # "cpu" or "cuda": where the model's kernels run
    cross_compiler: str | None = None  # g++ driver that links the library (None: host compiler)
    needs: tuple[str, ...] = field(default_factory=tuple)  # Debian packages the preset needs here

    def tvm_target(self) -> dict[str, Any]:
        """The TVM target dict with host-dependent fields resolved."""
        target = json.loads(json.dumps(self.target))
        host = detect_host()
        for d in (target, target.get("host", {})):
            if d.get("mcpu") == "host":
                d["mcpu"] = host.llvm_mcpu
            if d.get("kind") == "llvm" and "num-cores" not in d and self.arch == host.arch:
                d["num-cores"] = host.cores
        return target

    def cpu_features(self) -> list[str]:
        """CPU flags the generated host code needs (x86 vector extensions; empty when only the baseline)."""
        target = self.tvm_target()
        host = target.get("host", target)
        return list(_MCPU_FEATURES.get(str(host.get("mcpu", "")), ())) if self.arch == "x86_64" else []

    def missing_tools(self) -> list[str]:
        """Debian packages this preset needs that are not installed here."""
        if self.cross_compiler and platform.machine() != self.arch and not shutil.which(self.cross_compiler):
            return list(self.needs)
        return []

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "target": self.tvm_target(), "arch": self.arch, "device": self.device}
        if self.cpu_features():
            d["cpu_features"] = self.cpu_features()  # the runtime refuses clearly where they are missing
        return d


def _cuda_arch() -> str:
    """Detected GPU architecture (sm_XY) via nvidia-smi, else sm_80."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
        if out:
            return "sm_" + out[0].replace(".", "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "sm_80"


_X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "host"}

PRESETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in [
        TargetSpec("x86-64", "this x86-64 CPU, vector features detected", dict(_X86_HOST), "x86_64"),
        TargetSpec(
            "x86-64-avx2", "any x86-64 CPU with AVX2 + FMA (Haswell, Zen)",
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, "x86_64",
        ),
        TargetSpec(
            "x86-64-avx512", "x86-64 with AVX-512 (Skylake-SP, Ice Lake, Zen 4)",
            {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, "x86_64",
        ),
        TargetSpec(
            "aarch64", "generic 64-bit Arm with NEON",
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic", "mattr": ["+neon"]},
            "aarch64", cross_compiler=_AARCH64_GCC, needs=("g++-aarch64-linux-gnu",),
        ),
        TargetSpec(
            "rpi4", "Raspberry Pi 4 (Cortex-A72)",
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
             "num-cores": 4},
            "aarch64", cross_compiler=_AARCH64_GCC, needs=("g++-aarch64-linux-gnu",),
        ),
        TargetSpec(
            "rpi5", "Raspberry Pi 5 (Cortex-A76)",
            {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"],
             "num-cores": 4},
            "aarch64", cross_compiler=_AARCH64_GCC, needs=("g++-aarch64-linux-gnu",),
        ),
        TargetSpec(
            "riscv64", "64-bit RISC-V, rv64gc",
            {"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mcpu": "generic-rv64", "mabi": "lp64d",
             "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c"]},
            "riscv64", cross_compiler=_RISCV64_GCC, needs=("g++-riscv64-linux-gnu",),
        ),
        TargetSpec(
            "cuda", "NVIDIA GPU (architecture detected, else sm_80)",
            {"kind": "cuda", "arch": "detect", "host": dict(_X86_HOST)}, "x86_64", device="cuda",
        ),
        TargetSpec(
            "cuda-sm80", "NVIDIA Ampere data-center GPU (A100, A30; sm_80; PTX for newer GPUs)",
            {"kind": "cuda", "arch": "sm_80", "host": dict(_X86_HOST)}, "x86_64", device="cuda",
        ),
        TargetSpec(
            "cuda-sm90", "NVIDIA Hopper GPU (H100, H200; sm_90)",
            {"kind": "cuda", "arch": "sm_90", "host": dict(_X86_HOST)}, "x86_64", device="cuda",
        ),
        TargetSpec(
            "jetson-orin", "NVIDIA Jetson Orin (sm_87, Cortex-A78AE host)",
            {"kind": "cuda", "arch": "sm_87",
             "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"]}},
            "aarch64", device="cuda", cross_compiler=_AARCH64_GCC, needs=("g++-aarch64-linux-gnu",),
        ),
    ]
}


def resolve_target(name_or_json: str) -> TargetSpec:
    """A preset by name, or a TVM target dictionary given as JSON (for power users)."""
    text = name_or_json.strip()
    if text.startswith("{"):
        try:
            target = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"target JSON is not valid JSON: {e}") from None
        if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
            raise InvalidInput('target JSON must be an object with a "kind", e.g. {"kind": "llvm"}')
        host = target.get("host", target)
        if not isinstance(host, dict):
            raise InvalidInput('target JSON: "host" must be an object, e.g. {"kind": "llvm", "mtriple": "..."}')
        triple = host.get("mtriple", "")
        arch = triple.split("-")[0] if isinstance(triple, str) and triple else platform.machine()
        known = sorted({platform.machine(), *_CROSS})
        if arch not in known:  # an LLVM triple forgeml cannot link for (an unknown one crashed LLVM)
            raise InvalidInput(f'target JSON: "mtriple" {json.dumps(triple)} is not a machine forgeml builds '
                               f"for; its first part must be one of {', '.join(known)}")
        if target["kind"] == "cuda" and not str(target.get("arch", "")).startswith("sm_"):
            raise InvalidInput('target JSON: a "cuda" target needs "arch": "sm_XY", e.g. '
                               '{"kind": "cuda", "arch": "sm_80"} (or the preset cuda, which detects it)')
        mattr = host.get("mattr", [])
        fpu = {"d": "+d", "f": "+f"}.get(str(host.get("mabi", ""))[-1:]) if arch == "riscv64" else None
        if fpu and fpu not in mattr:
            # LLVM warns, links, flags the library hard-float and emits soft-float libcalls that fail at load
            raise InvalidInput(f'riscv64 target with "mabi": "{host["mabi"]}" needs "{fpu}" in "mattr" '
                               "(else the code calls soft-float helpers the device cannot resolve)")
        cross, needs = _CROSS.get(arch, (None, ())) if arch != platform.machine() else (None, ())
        return TargetSpec("custom", "user-given TVM target", target, arch,
                          device="cuda" if target["kind"] == "cuda" else "cpu", cross_compiler=cross, needs=needs)
    spec = PRESETS.get(text)
    if spec is None:
        raise InvalidInput(f"unknown target '{text}'; known: {', '.join(PRESETS)}")
    if spec.target.get("arch") == "detect":
        spec = replace(spec, target={**spec.target, "arch": _cuda_arch()})
    return spec
