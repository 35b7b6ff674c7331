"""GPU speed, side by side: forgeml fp32, forgeml fp16 (mixed precision), ONNX Runtime (CUDA provider on
the fp32 model with TF32 on and off, CUDA on an fp16 copy of the model, TensorRT fp16; each where its
provider loads) and PyTorch eager on CUDA (fp32 and fp16), on the zoo models at batch 1 and 32,
alternating in one run, each output checked against ONNX Runtime (CPU) reference outputs. Every row
names its precision (fp32, tf32, fp16) and a speed ratio is only printed between rows of equal
precision (forgeml.bench.baselines).

    python benchmarks/gpu.py all                      # a machine with the compiler and a GPU
    python benchmarks/gpu.py prepare --work build/gpu # no GPU needed: export, compile, reference outputs
    python benchmarks/gpu.py pack --work build/gpu --bundle .gpubundle   # for a GPU machine without TVM
    python benchmarks/gpu.py run --bundle .gpubundle  # on the GPU machine: check, measure, write results

On this project's GPU machines (no TVM, CPU-only onnxruntime, 64 MiB per call): put the cp312
apache-tvm-ffi wheel in .gpubundle/wheels, build .ortgpu/site.tar.xz with benchmarks/ort_cuda_pack.py
and copy prepare's plan.json beside it, then run benchmarks/gpu_device_ort.sh (carry .ortgpu) and,
on the same warm machine, benchmarks/gpu_device_run.sh (carry .gpubundle).

`prepare` compiles with `--target` (default cuda-sm90: H100/H200). `pack` writes what `run` needs
when the GPU machine has no TVM compiler and little room: the artifacts split into members, each
stored once (batch 1 and 32 share weights), fp16 weights rebuilt from the fp32 ones where a cast
gives them exactly (every rebuilt member is checked against the manifest's sha256 before use),
the TVM runtime libraries and the reference outputs. `run` needs numpy, tvm_ffi and the TVM runtime
libraries (plus torch / onnxruntime for the baselines); results go to benchmarks/results/gpu.md and
gpu.json unless --out says otherwise.

Timing: every engine runs on inputs already on the GPU and synchronizes after each call (a host
timer around call + synchronize, so launch overhead counts as a user sees it); engines alternate in
blocks of 10. forgeml's time inside the TVM runtime (CUDA events, `runtime.RPCTimeEvaluator`) is
reported beside it. GPU memory: the drop in the device's free memory (cudaMemGetInfo) from before
an engine is created to after its warm-up runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

# tvm_ffi JIT-compiles a torch extension at import when torch is installed; nothing here needs it
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mlp", "resnet18", "mobilenet_v2", "bert_tiny")
BATCHES = (1, 32)
PRECISIONS = ("fp32", "fp16")
# forgeml builds per case: name -> (precision, CUDA graph (None: the compiler's default, on), convolution
# layout ("auto": the compiler's default, NHWC in fp16), tensor-core schedule). Every build uses the tuning
# database's records where they beat the rules, except the "untuned" ones (rules only).
VARIANTS = {"fp32": ("fp32", None, "auto", "wmma"), "fp16": ("fp16", None, "auto", "wmma"),
            "fp32 no-graph": ("fp32", False, "auto", "wmma"), "fp16 no-graph": ("fp16", False, "auto", "wmma"),
            "fp32 untuned": ("fp32", None, "auto", "wmma"), "fp16 untuned": ("fp16", None, "auto", "wmma"),
            "fp32 nhwc": ("fp32", None, "NHWC", "wmma"), "fp16 nchw": ("fp16", None, "NCHW", "wmma"),
            "fp16 nchw untuned": ("fp16", None, "NCHW", "wmma"), "fp16 mma": ("fp16", None, "auto", "mma"),
            "fp16 nchw mma": ("fp16", None, "NCHW", "mma")}


def _say(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _case_id(model: str, batch: int) -> str:
    return f"{model}_b{batch}"


def bench_inputs(model: str, batch: int) -> dict:
    """Inputs made by integer hashing, bit-identical on any machine and numpy version (so only their
    sha256 travels): floats uniform in [-2, 2), token ids in [0, vocabulary)."""
    import numpy as np

    from forgeml.zoo import BERT_VOCAB, get_model, input_shapes

    feeds = {}
    for i, (name, shape) in enumerate(input_shapes(model, batch).items()):
        n = int(np.prod(shape))
        h = (np.arange(n, dtype=np.uint64) + np.uint64(1 + 7919 * i)) * np.uint64(2654435761) % np.uint64(2**32)
        dtype = np.dtype(get_model(model).inputs[name][1])
        if dtype.kind in "iu":
            feeds[name] = (h % np.uint64(BERT_VOCAB)).astype(dtype).reshape(shape)
        else:
            feeds[name] = ((h >> np.uint64(8)).astype(np.float64) / 2**24 * 4 - 2).astype(dtype).reshape(shape)
    return feeds


def _inputs_digest(feeds: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(feeds):
        digest.update(name.encode() + feeds[name].tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# prepare: export, compile, reference outputs (no GPU needed)
# ------------------------------------------------------------------------------------------------

def prepare(work: Path, models: list[str], batches: list[int], target: str, reuse: bool = False,
            variants: tuple[str, ...] = ("fp32", "fp16")) -> dict:
    import numpy as np

    from forgeml.compiler.build import CompileOptions, compile_model
    from forgeml.compiler.verify import onnxruntime_session
    from forgeml.zoo import export_zoo_model

    for sub in ("onnx", "artifacts", "refs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    plan = {"target": target, "cases": []}
    for model in models:
        for batch in batches:
            cid = _case_id(model, batch)
            onnx_path = work / "onnx" / f"{cid}.onnx"
            if not onnx_path.exists():
                _say(f"exporting {cid}")
                export_zoo_model(model, onnx_path, batch=batch)
            feeds = bench_inputs(model, batch)
            ort = onnxruntime_session(onnx_path)
            names = [o.name for o in ort.get_outputs()]
            outputs = dict(zip(names, ort.run(names, feeds)))
            np.savez(work / "refs" / f"{cid}.npz", inputs_sha256=np.array(_inputs_digest(feeds)),
                     **{f"out.{k}": v for k, v in outputs.items()})
            case = {"id": cid, "model": model, "batch": batch, "onnx": f"onnx/{cid}.onnx",
                    "ref": f"refs/{cid}.npz", "artifacts": {}}
            for variant in variants:
                precision, cuda_graph, conv_layout, tensor_core_schedule = VARIANTS[variant]
                out = work / "artifacts" / f"{cid}_{variant.replace(' ', '_')}.fml"
                start = time.perf_counter()
                if reuse and out.exists():
                    from forgeml.runtime.artifact import open_artifact

                    manifest = open_artifact(out).manifest
                    compile_s = round(sum(manifest.compile_options.get("seconds", {}).values()), 1)
                else:
                    _say(f"compiling {cid} {variant} for {target}")
                    manifest = compile_model(onnx_path, out, CompileOptions(target=target, precision=precision,
                                                                            use_tuning_db="untuned" not in variant,
                                                                            cuda_graph=cuda_graph,
                                                                            conv_layout=conv_layout,
                                                                            tensor_core_schedule=tensor_core_schedule))
                    compile_s = round(time.perf_counter() - start, 1)
                case["artifacts"][variant] = {
                    "path": f"artifacts/{out.name}", "compile_s": compile_s,
                    "seconds": manifest.compile_options.get("seconds"),
                    "cuda_kernels": manifest.compile_options.get("cuda_kernels"),
                    "tolerance": manifest.verification.get("tolerance"), "mb": round(out.stat().st_size / 1e6, 2),
                    "tuning": {k: manifest.tuning.get(k) for k in ("tasks", "tuned_kernels_used", "rule_kernels_kept")
                               if k in manifest.tuning}}
            plan["cases"].append(case)
            (work / "plan.json").write_text(json.dumps(plan, indent=2))
    return plan


# ------------------------------------------------------------------------------------------------
# pack / unpack: move artifacts to a GPU machine in as few bytes as can be checked
# ------------------------------------------------------------------------------------------------

def _shuffle(data: bytes, width: int) -> bytes:
    """Byte-plane shuffle (all first bytes, all second bytes, ...): float tensors compress better."""
    import numpy as np

    if width <= 1 or len(data) % width:
        return data
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(data: bytes, width: int) -> bytes:
    import numpy as np

    if width <= 1 or len(data) % width:
        return data
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _weights_of(manifest: dict, blob: bytes) -> list:
    import numpy as np

    return [np.frombuffer(blob, dtype=w["dtype"], count=int(np.prod(w["shape"], dtype=np.int64)),
                          offset=w["offset"]).reshape(w["shape"]) for w in manifest["weights"]]


def pack(work: Path, bundle: Path, with_runtime: bool = True, cases: list[str] | None = None) -> dict:
    """Write `bundle`: unique members (lzma, float bytes shuffled), fp16 weights as cast recipes; only the
    `cases` (ids such as resnet18_b32) when given (one device call carries 64 MiB)."""
    plan = json.loads((work / "plan.json").read_text())
    if cases:
        unknown = set(cases) - {c["id"] for c in plan["cases"]}
        if unknown:
            raise SystemExit(f"--cases: {', '.join(sorted(unknown))} not in {work}/plan.json")
        plan["cases"] = [c for c in plan["cases"] if c["id"] in cases]
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "blobs").mkdir(parents=True)
    (bundle / "refs").mkdir()
    stored: dict[str, int] = {}

    def store(data: bytes, width: int = 1) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in stored:
            packed = lzma.compress(_shuffle(data, width), preset=6)
            (bundle / "blobs" / digest).write_bytes(packed)
            stored[digest] = len(packed)
        return digest

    index = {}
    for case in plan["cases"]:
        shutil.copy(work / case["ref"], bundle / "refs" / Path(case["ref"]).name)
        fp32_weights = None
        for variant, art in case["artifacts"].items():
            precision = VARIANTS[variant][0]
            with tarfile.open(work / art["path"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            manifest = json.loads(members["manifest.json"])
            entry = {"manifest": manifest, "members": {}}
            for name, data in members.items():
                if name == "manifest.json":
                    continue
                if name == "weights.bin" and precision == "fp16" and fp32_weights is not None:
                    entry["members"][name] = _weight_recipe(manifest, data, fp32_weights, store)
                else:
                    entry["members"][name] = {"blob": store(data, 4 if name == "weights.bin" else 1),
                                              "width": 4 if name == "weights.bin" else 1}
            if variant == "fp32":
                fp32_weights = (manifest, entry["members"]["weights.bin"]["blob"], members["weights.bin"])
            index[Path(art["path"]).name] = entry
    (bundle / "index.json").write_text(json.dumps({"plan": plan, "artifacts": index}, indent=1))
    if with_runtime:
        _copy_runtime(bundle)
    total = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    _say(f"bundle {bundle}: {total / 2**20:.1f} MiB ({len(stored)} blobs)")
    return {"bytes": total, "blobs": len(stored)}


def _weight_recipe(manifest: dict, data: bytes, fp32, store) -> dict:
    """fp16 weights.bin as: for each tensor, 'cast fp32 tensor j' when exact, else its own blob."""
    import numpy as np

    src_manifest, src_blob, src_data = fp32
    sources = _weights_of(src_manifest, src_data)
    targets = _weights_of(manifest, data)
    steps = []
    for value in targets:
        step = None
        for j, src in enumerate(sources):
            if src.shape == value.shape and np.array_equal(src.astype(value.dtype).view(np.uint8),
                                                             np.ascontiguousarray(value).view(np.uint8)):
                step = {"cast_from": j}
                break
        if step is None:
            step = {"blob": store(np.ascontiguousarray(value).tobytes(), value.dtype.itemsize)}
        steps.append(step)
    return {"weights_recipe": steps, "source_blob": src_blob, "source_width": 4,
            "sha256": hashlib.sha256(data).hexdigest()}


def _copy_runtime(bundle: Path) -> None:
    """libtvm_runtime.so + libtvm_runtime_cuda.so from the installed TVM, and libcudart if found (lzma)."""
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    lib = Path(spec.submodule_search_locations[0]) / "lib"
    (bundle / "lib").mkdir(exist_ok=True)
    sources = [lib / "libtvm_runtime.so", lib / "libtvm_runtime_cuda.so"]
    sources += [Path(c) for c in ("/usr/local/cuda/lib64/libcudart.so.13", "/usr/local/cuda/lib/libcudart.so.13")
                if Path(c).exists()][:1]
    for src in sources:
        (bundle / "lib" / (src.name + ".xz")).write_bytes(lzma.compress(src.resolve().read_bytes(), preset=6))


def _runtime_from_bundle(bundle: Path, base: Path) -> None:
    """Unpack the bundle's runtime libraries and point forgeml at them."""
    if not (bundle / "lib").exists():
        return
    (base / "lib").mkdir(parents=True, exist_ok=True)
    for packed in (bundle / "lib").glob("*.xz"):
        (base / "lib" / packed.stem).write_bytes(lzma.decompress(packed.read_bytes()))
    os.environ["FORGEML_TVM_LIB"] = str(base / "lib")


def _load_first(path: Path):
    """Load one artifact (creates the CUDA context); if libcudart is not found, use the bundle's copy."""
    import ctypes

    import forgeml
    from forgeml.errors import ArtifactError

    try:
        return forgeml.load(path)
    except ArtifactError as e:
        cudart = Path(os.environ.get("FORGEML_TVM_LIB", "")) / "libcudart.so.13"
        if "libcudart" not in str(e) or not cudart.exists():
            raise
        _say(f"no libcudart.so.13 on the library path; loading {cudart}")
        ctypes.CDLL(str(cudart), ctypes.RTLD_GLOBAL)
        return forgeml.load(path)


def unpack(bundle: Path, dest: Path) -> dict:
    """Rebuild the artifacts of `bundle` under dest/artifacts; every member is checked by sha256."""
    import numpy as np

    from forgeml.runtime.artifact import Manifest, pack_weights, write_artifact

    index = json.loads((bundle / "index.json").read_text())
    cache: dict[str, bytes] = {}

    def blob(digest: str, width: int) -> bytes:
        if digest not in cache:
            cache[digest] = _unshuffle(lzma.decompress((bundle / "blobs" / digest).read_bytes()), width)
        return cache[digest]

    (dest / "artifacts").mkdir(parents=True, exist_ok=True)
    for fname, entry in index["artifacts"].items():
        manifest = Manifest.from_json(entry["manifest"], fname)
        files = {}
        for name, how in entry["members"].items():
            if "weights_recipe" in how:
                src = blob(how["source_blob"], how["source_width"])
                src_manifest = next(e["manifest"] for e in index["artifacts"].values()
                                    if e["members"].get("weights.bin", {}).get("blob") == how["source_blob"])
                sources = _weights_of(src_manifest, src)
                tensors = []
                for w, step in zip(entry["manifest"]["weights"], how["weights_recipe"]):
                    if "cast_from" in step:
                        tensors.append((w["name"], sources[step["cast_from"]].astype(w["dtype"])))
                    else:
                        raw = blob(step["blob"], np.dtype(w["dtype"]).itemsize)
                        tensors.append((w["name"], np.frombuffer(raw, w["dtype"]).reshape(w["shape"])))
                data, _ = pack_weights(tensors)
            else:
                data = blob(how["blob"], how["width"])
            expected = entry["manifest"]["members"][name]
            if hashlib.sha256(data).hexdigest() != expected:
                raise RuntimeError(f"{fname}: rebuilt member {name} does not match its sha256")
            files[name] = data
        write_artifact(dest / "artifacts" / fname, manifest, files)
    return index["plan"]


# ------------------------------------------------------------------------------------------------
# run: on the GPU machine
# ------------------------------------------------------------------------------------------------

def _max_rel(actual: dict, expected: dict) -> tuple[float, float]:
    from forgeml.compiler.verify import compare

    return compare(actual, expected)


def _load_ref(path: Path, model: str, batch: int) -> tuple[dict, dict]:
    """(inputs, reference outputs); the inputs are remade here and checked against the stored digest."""
    import numpy as np

    data = np.load(path)
    feeds = bench_inputs(model, batch)
    if _inputs_digest(feeds) != str(data["inputs_sha256"]):
        raise RuntimeError(f"{path}: the inputs made here differ from those the reference outputs came from")
    outputs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    return feeds, outputs


def _torch_case(model: str, feeds: dict, precision: str, device: str = "cuda"):
    """PyTorch eager on CUDA: (runner, outputs as numpy dict keyed like the reference)."""
    import torch

    from forgeml.zoo import get_model

    zoo = get_model(model)
    module = zoo.build().eval().to(device)
    args = [torch.from_numpy(feeds[k]).to(device) for k in zoo.inputs]
    if precision == "fp16":
        module = module.half()
        args = [a.half() if a.is_floating_point() else a for a in args]

    def run():
        with torch.inference_mode():
            out = module(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()
    outs = out if isinstance(out, (tuple, list)) else [out]
    values = {name: o.float().cpu().numpy() for name, o in zip(zoo.output_names, outs)}
    return run, values


# ONNX Runtime rows: label -> forgeml.bench.baselines name (each at the precision it computes in)
ORT_BASELINES = {"onnxruntime cuda tf32": "onnxruntime", "onnxruntime cuda fp32": "onnxruntime-tf32-off",
                 "onnxruntime cuda fp16": "onnxruntime-fp16", "onnxruntime trt fp16": "onnxruntime-trt-fp16"}
TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "fp16": 2e-2}


def _ort_case(label: str, onnx_path: Path, feeds: dict, engine_cache: Path | None):
    """(runner, outputs, extra) of an ONNX Runtime GPU baseline; BaselineUnavailable where its provider is
    missing. TensorRT's engine build (session + first run) is in extra["build_s"], never in the timing."""
    from forgeml.bench.baselines import BASELINES, gpu_runner

    gpu = gpu_runner(BASELINES[ORT_BASELINES[label]], onnx_path, feeds, engine_cache=engine_cache)
    return gpu.run, gpu.outputs(), gpu.extra


def _precision(label: str, info: dict) -> str:
    """The precision a row computes in: forgeml's variant's, ONNX Runtime's baseline's, PyTorch's
    (fp32 eager is "tf32" when cuDNN or cuBLAS may use TF32, as PyTorch's defaults allow for convolutions)."""
    from forgeml.bench.baselines import BASELINES, precision_of

    if label.startswith("forgeml "):
        return VARIANTS[label.removeprefix("forgeml ")][0]
    if label in ORT_BASELINES:
        return precision_of(BASELINES[ORT_BASELINES[label]], on_cuda=True)
    if label.endswith("fp16"):
        return "fp16"
    return "tf32" if info.get("torch_tf32_conv") or info.get("torch_tf32_matmul") else "fp32"


def _ort_cuda_options(onnx_path: Path) -> dict:
    """The CUDA provider's settings as ONNX Runtime reports them (use_tf32, cudnn_conv_algo_search...)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
    return session.get_provider_options().get("CUDAExecutionProvider", {})


def _nvml_used_mib() -> float | None:
    """Device-wide used memory as nvidia-smi reports it (NVML; needs no CUDA context)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def measure_memory(engine: str, model: str, batch: int, precision: str, artifact: str | None) -> dict:
    """In a fresh process: GPU memory of one engine after creating it and running it 3 times.
    process_mib: nvidia-smi's device-wide used memory, after minus before (CUDA context included);
    beyond_context_mib: the drop in cudaMemGetInfo's free memory once the context exists."""
    used0 = _nvml_used_mib()
    feeds = bench_inputs(model, batch)
    if engine == "forgeml":
        from forgeml.runtime import device, native

        native.load_runtime("cuda")
        before = device.cuda_memory()  # creates the context
        import forgeml

        runner = device.DeviceRunner(forgeml.load(artifact), feeds)
        for _ in range(3):
            runner()
        after = device.cuda_memory()
        beyond = before["free_mib"] - after["free_mib"] if before and after else None
    else:
        import torch

        free0, _ = torch.cuda.mem_get_info()  # creates the context
        run, _ = _torch_case(model, feeds, precision)
        for _ in range(3):
            run()
        free1, _ = torch.cuda.mem_get_info()
        beyond = (free0 - free1) / 2**20
    used1 = _nvml_used_mib()
    return {"process_mib": None if used0 is None or used1 is None else round(used1 - used0, 1),
            "beyond_context_mib": None if beyond is None else round(beyond, 1)}


def _memory_in_subprocess(base: Path, engine: str, model: str, batch: int, precision: str,
                          artifact: str | None) -> dict:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "mem", "--engine", engine, "--models", model,
           "--batches", str(batch), "--precision", precision] + (["--artifact", artifact] if artifact else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mem_used(before: dict | None) -> float | None:
    from forgeml.runtime.device import cuda_memory

    after = cuda_memory()
    if before is None or after is None:
        return None
    return round(before["free_mib"] - after["free_mib"], 1)


def _onnx_of(base: Path, case: dict, onnx_dir: Path | None) -> Path | None:
    """The case's ONNX model: prepare's copy, else one exported on this machine (`export-onnx`)."""
    for path in (base / case["onnx"], onnx_dir / Path(case["onnx"]).name if onnx_dir else None):
        if path is not None and path.exists():
            return path
    return None


def export_onnx(plan: dict, dest: Path) -> None:
    """Export the plan's zoo models here (torch only, no TVM): the bundle carries no ONNX files, and
    the seeded zoo weights are the same on any machine (the outputs are checked against the references)."""
    from forgeml.zoo import export_zoo_model

    dest.mkdir(parents=True, exist_ok=True)
    for case in plan["cases"]:
        path = dest / Path(case["onnx"]).name
        if not path.exists():
            _say(f"exporting {case['id']} -> {path}")
            export_zoo_model(case["model"], path, batch=case["batch"])


def run(base: Path, out: Path, repeat: int, budget_s: float, torch_baseline: bool = True,
        memory: bool = True, onnx_dir: Path | None = None, isolate: tuple[str, ...] = (),
        ort_baselines: tuple[str, ...] = tuple(ORT_BASELINES)) -> dict:
    """Check every artifact against the reference outputs and measure all engines, alternating. The
    `isolate` variants (new kernels) first run in a process of their own and are left out where they
    fail there."""
    import numpy as np

    import forgeml
    from forgeml.bench.harness import Stats, measure_alternating
    from forgeml.runtime import device

    plan = json.loads((base / "plan.json").read_text()) if (base / "plan.json").exists() else None
    if plan is None:
        raise SystemExit(f"{base}/plan.json not found: run `prepare` (or `unpack`) first")
    info = {"gpu": device.gpu_info(), "python": platform.python_version(), "host": platform.node()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    torch = None
    if torch_baseline:
        try:
            import torch

            info["torch"] = torch.__version__
            info["torch_cuda"] = bool(torch.cuda.is_available())
            info["torch_tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
            info["torch_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except ImportError:
            torch = None
    _say(f"GPU: {info['gpu']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": info, "settings": {"repeat": repeat, "budget_s_per_engine": budget_s, "block": 10},
               "target": plan["target"], "cases": [],
               "tuned": {f"{c['id']} {v}": a["tuning"] for c in plan["cases"] for v, a in c["artifacts"].items()
                         if a.get("tuning", {}).get("tuned_kernels_used")}}
    # the CUDA context first, so that no engine's memory figure includes it
    _load_first(base / next(iter(plan["cases"][0]["artifacts"].values()))["path"])
    for case in plan["cases"]:
        cid, model, batch = case["id"], case["model"], case["batch"]
        feeds, expected = _load_ref(base / case["ref"], model, batch)
        engines: dict[str, dict] = {}
        runners = {}
        isolated: dict[str, dict] = {}  # label -> its run in a process of its own (also its memory figure)
        for variant, art in case["artifacts"].items():
            label = f"forgeml {variant}"
            if variant in isolate:  # a kernel fault would poison this process's CUDA context for all
                first = isolated[label] = _memory_in_subprocess(base, "forgeml", model, batch, VARIANTS[variant][0],
                                                                str(base / art["path"]))
                if "error" in first:
                    engines[label] = {"error": f"failed in a process of its own, not run here: {first['error']}"}
                    _say(f"{cid} {label}: {engines[label]['error']}")
                    continue
            try:
                before = device.cuda_memory()
                session = forgeml.load(base / art["path"])
                runner = device.DeviceRunner(session, feeds)
                runner()
                e2e = session.run(feeds)  # host -> device -> host, as Session.run is used
                abs_err, rel_err = _max_rel(runner.outputs(), expected)
                abs2, rel2 = _max_rel(e2e, expected)
                engines[label] = {"max_abs_error": max(abs_err, abs2), "max_rel_error": max(rel_err, rel2),
                                  "tolerance": art["tolerance"],
                                  "passed": bool(max(rel_err, rel2) <= art["tolerance"]),
                                  "compile_s": art.get("compile_s"), "artifact_mb": art.get("mb")}
                start = time.perf_counter()
                for _ in range(3):
                    runner()
                est = (time.perf_counter() - start) / 3
                engines[label]["gpu_mem_inprocess_mib"] = _mem_used(before)
                runners[label] = runner
                try:  # about 0.25 s of device time at most
                    number = max(1, min(10, int(0.05 / max(est, 1e-6))))
                    per_run = device.time_evaluator(session, feeds, number=number, repeat=5)
                    engines[label]["device_timer_ms"] = round(float(np.median(per_run)) * 1e3, 4)
                except Exception as e:  # noqa: BLE001 (timing extra; the host-timer numbers stand)
                    engines[label]["device_timer_error"] = f"{type(e).__name__}: {e}"[:200]
                e2e_times = []
                for _ in range(5):
                    start = time.perf_counter()
                    session.run(feeds)
                    e2e_times.append(time.perf_counter() - start)
                engines[label]["with_copies_ms"] = round(float(np.median(e2e_times)) * 1e3, 4)
            except Exception as e:  # noqa: BLE001 (report it and go on with the other engines)
                engines[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
                _say(f"{cid} {label}: {engines[label]['error']}")
        onnx_path = _onnx_of(base, case, onnx_dir)
        for label in ort_baselines if onnx_path is not None else ():
            precision = _precision(label, info)
            try:
                if "CUDAExecutionProvider" in info["onnxruntime_providers"] and "onnxruntime_cuda_options" not in info:
                    info["onnxruntime_cuda_options"] = _ort_cuda_options(onnx_path)
                before = device.cuda_memory()
                runner, values, extra = _ort_case(label, onnx_path, feeds, None)  # TensorRT cache: a temp dir
                abs_err, rel_err = _max_rel(values, expected)
                tol = TOLERANCE[precision]
                engines[label] = {"max_abs_error": abs_err, "max_rel_error": rel_err, "tolerance": tol,
                                  "passed": bool(rel_err <= tol), "gpu_mem_inprocess_mib": _mem_used(before),
                                  "build_s": extra.get("build_s"), "provider_options": extra["provider_options"]}
                runners[label] = runner
            except Exception as e:  # noqa: BLE001 (BaselineUnavailable: "provider not available")
                engines[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
                _say(f"{cid} {label}: {engines[label]['error']}")
        if torch is not None and info.get("torch_cuda"):
            for precision in PRECISIONS:
                label = f"pytorch eager {precision}"
                try:
                    before = device.cuda_memory()
                    runner, values = _torch_case(model, feeds, precision)
                    tol = 1e-3 if precision == "fp32" else 2e-2
                    abs_err, rel_err = _max_rel(values, expected)
                    for _ in range(3):
                        runner()
                    engines[label] = {"max_abs_error": abs_err, "max_rel_error": rel_err, "tolerance": tol,
                                      "passed": bool(rel_err <= tol), "gpu_mem_inprocess_mib": _mem_used(before)}
                    runners[label] = runner
                except Exception as e:  # noqa: BLE001
                    engines[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    _say(f"{cid} {label}: {engines[label]['error']}")
        # adaptive run count: about budget_s per engine, at least 20 runs
        n = repeat
        for runner in runners.values():
            start = time.perf_counter()
            for _ in range(3):
                runner()
            est = (time.perf_counter() - start) / 3
            n = max(20, min(n, int(budget_s / max(est, 1e-6))))
        n -= n % 10
        _say(f"{cid}: measuring {', '.join(runners)} ({n} runs each)")
        samples = measure_alternating(runners, warmup=5, repeat=n, block=10, pause_s=0.0)
        for label in engines:
            engines[label]["precision"] = _precision(label, info)
        for label, times in samples.items():
            stats = Stats.of(times, batch=batch)
            engines[label]["stats"] = {k: round(v, 4) for k, v in stats.__dict__.items()}
            engines[label]["runs"] = len(times)
        if memory:
            for label, e in engines.items():
                if "stats" not in e or label.startswith("onnxruntime"):
                    continue
                variant = label.removeprefix("forgeml ")
                engine, precision = ("forgeml", VARIANTS[variant][0]) if label.startswith("forgeml") else \
                    ("torch", label.split()[-1])
                artifact = str(base / case["artifacts"][variant]["path"]) if engine == "forgeml" else None
                mem = isolated.get(label) or _memory_in_subprocess(base, engine, model, batch, precision, artifact)
                e["gpu_memory"] = mem
                e["gpu_mem_mib"] = mem.get("process_mib")
        results["cases"].append({"id": cid, "model": model, "batch": batch, "engines": engines})
        _say(f"{cid}: " + ", ".join(f"{k} {v['stats']['p50_ms']:.3f} ms" for k, v in engines.items() if "stats" in v))
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))  # partial results survive a timeout
        out.with_suffix(".md").write_text(markdown(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    return results


def _tuning_text(tuned: dict) -> str:
    """Which artifacts use tuned kernels (MetaSchedule records that beat the rules), for the report."""
    if not tuned:
        return "no tuning"
    return "with tuned kernels where the tuning database had faster ones: " + ", ".join(
        f"{name} {t['tuned_kernels_used']} of {t['tasks']} kernels" for name, t in tuned.items())


def same_precision_ratio(engines: dict, prefix: str, precision: str, p50_ms: float) -> str:
    """p50 of the first measured row whose label starts with `prefix` and whose precision is `precision`,
    over p50_ms ("1.23x"), or "-" when there is none: never a ratio across precisions."""
    for label, e in engines.items():
        if label.startswith(prefix) and e.get("precision") == precision and "stats" in e:
            return f"{e['stats']['p50_ms'] / p50_ms:.2f}x"
    return "-"


def markdown(results: dict) -> str:
    gpu = results["machine"].get("gpu", {})
    m = results["machine"]
    gpu_name = gpu.get("name", "unknown GPU")
    lines = [
        "# GPU latency at equal precision: forgeml vs ONNX Runtime (CUDA, TensorRT) vs PyTorch eager",
        "",
        f"GPU: **{gpu_name}** ({gpu.get('memory.total', '?')}, compute capability {gpu.get('compute_cap', '?')}, "
        f"driver {gpu.get('driver_version', '?')}); Python {m.get('python')}, torch {m.get('torch', 'absent')}, "
        f"onnxruntime {m.get('onnxruntime', 'absent')} (providers: {', '.join(m.get('onnxruntime_providers', []))})."
        f" Artifacts compiled for `{results['target']}` with forgeml's default GPU schedules (dlight rules), "
        f"{_tuning_text(results.get('tuned', {}))}. `graph`: the launches replayed as one CUDA graph "
        "(forgeml's default for CUDA targets "
        "since this run; the rows without it are `--no-cuda-graph`).",
        "",
        "Every engine runs on inputs already on the GPU, and is timed on the host around call + device "
        "synchronize; engines alternate in blocks of 10 on the same seeded inputs, in one process. "
        "`dev ms`: forgeml's time inside the TVM runtime (CUDA events, median of 5 means of up to 10 runs). "
        "`+copies ms`: forgeml's `Session.run` with numpy in and out (host-device copies). "
        "`rel err`: max |out - ONNX Runtime CPU| / max |ONNX Runtime CPU| over every output element. "
        "`GPU MiB`: GPU memory of the engine alone in a fresh process, after creating it and 3 runs "
        "(nvidia-smi's used memory, after minus before: CUDA context, kernels, weights, workspace; "
        "PyTorch's includes its caching allocator and cuBLAS/cuDNN; the JSON also has the part beyond "
        "the CUDA context).",
        "",
    ]
    if "CUDAExecutionProvider" not in m.get("onnxruntime_providers", []):
        lines += ["ONNX Runtime CUDA: **not measured**: the GPU machine's onnxruntime "
                  f"({m.get('onnxruntime', 'absent')}) has no CUDAExecutionProvider, and onnxruntime-gpu "
                  "could not be installed there.", ""]
    cuda_options = m.get("onnxruntime_cuda_options")
    if cuda_options:
        keys = ("use_tf32", "cudnn_conv_algo_search", "cudnn_conv_use_max_workspace", "enable_cuda_graph",
                "prefer_nhwc")
        lines += ["ONNX Runtime CUDA runs with its defaults (io binding, inputs and outputs on the GPU): "
                  + ", ".join(f"{k}={cuda_options[k]}" for k in keys if k in cuda_options) + ".", ""]
    if m.get("torch"):
        lines += [f"PyTorch fp32 runs with its defaults: TF32 convolutions {m.get('torch_tf32_conv')}, "
                  f"TF32 matmuls {m.get('torch_tf32_matmul')}. PyTorch fp16 is `module.half()` (fp16 "
                  "weights and activations).", ""]
    lines += ["Ratios are printed only between rows of **equal precision** (`prec`): fp16 (forgeml --precision "
              "fp16: fp16 compute, fp32 accumulation; ONNX Runtime CUDA on an fp16 copy of the model made by "
              "onnxconverter-common with fp32 inputs and outputs; ONNX Runtime TensorRT with trt_fp16_enable; "
              "PyTorch `.half()`), fp32 (forgeml fp32; ONNX Runtime CUDA with use_tf32=0), tf32 (ONNX Runtime "
              "CUDA's default use_tf32=1; PyTorch fp32 where its TF32 flags are on). `vs X`: p50 of X at the "
              "row's precision / p50 (above 1: faster than X); `-`: no row of X at that precision. "
              "`build s`: TensorRT's engine build (session creation and first run), never in the latency.", ""]
    header = ["model", "batch", "engine", "prec", "p50 ms", "p90 ms", "min ms", "items/s", "vs ORT CUDA",
              "vs ORT TRT", "vs torch", "dev ms", "+copies ms", "rel err", "ok", "GPU MiB", "build s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in results["cases"]:
        for label, e in case["engines"].items():
            prec = e.get("precision", "?")
            if "stats" not in e:
                lines.append(f"| {case['model']} | {case['batch']} | {label} | {prec} | "
                             f"not measured: {e.get('error', '?')[:100]} " + "| " * (len(header) - 5) + "|")
                continue
            s = e["stats"]
            ratios = [same_precision_ratio(case["engines"], prefix, prec, s["p50_ms"])
                      for prefix in ("onnxruntime cuda", "onnxruntime trt", "pytorch eager")]
            lines.append(
                f"| {case['model']} | {case['batch']} | {label} | {prec} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | "
                f"{s['min_ms']:.3f} | {s['throughput_per_s']:.0f} | {' | '.join(ratios)} | "
                f"{e.get('device_timer_ms', '-')} | {e.get('with_copies_ms', '-')} | "
                f"{e.get('max_rel_error', float('nan')):.2g} | {'yes' if e.get('passed') else 'NO'} | "
                f"{e.get('gpu_mem_mib') if e.get('gpu_mem_mib') is not None else '-'} | "
                f"{e.get('build_s') if e.get('build_s') is not None else '-'} |")
    lines += ["", f"Settings: {json.dumps(results['settings'])}.", ""]
    return "\n".join(lines)


def _unpack_to(bundle: Path, base: Path) -> None:
    """unpack() plus the reference outputs and plan.json, so that `run` finds everything under base."""
    plan = unpack(bundle, base)
    _runtime_from_bundle(bundle, base)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for case in plan["cases"]:
        shutil.copy(bundle / "refs" / Path(case["ref"]).name, base / "refs")
    (base / "plan.json").write_text(json.dumps(plan, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["all", "prepare", "pack", "unpack", "export-onnx", "run", "report", "mem"])
    parser.add_argument("--work", default=str(ROOT / "build" / "gpu"), help="prepare's output folder")
    parser.add_argument("--bundle", help="pack's output / run's input when built elsewhere")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--target", default="cuda-sm90")
    parser.add_argument("--repeat", type=int, default=200, help="most timed runs per engine")
    parser.add_argument("--budget-s", type=float, default=1.5, help="about this many seconds per engine per case")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="prepare: keep artifacts already compiled")
    parser.add_argument("--variants", default="fp32,fp16",
                        help=f"prepare: forgeml builds per case, of {', '.join(VARIANTS)}")
    parser.add_argument("--no-memory", action="store_true", help="run: skip the per-engine memory processes")
    parser.add_argument("--isolate", default="",
                        help="run: variants whose artifacts first run in a process of their own (dropped if they fail)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # mem: forgeml | torch
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", help="export-onnx's output / run's ONNX models when the bundle has none")
    parser.add_argument("--cases", default="", help="pack: only these case ids (e.g. resnet18_b32), comma-separated")
    parser.add_argument("--ort-baselines", default=",".join(ORT_BASELINES),
                        help=f"run: ONNX Runtime rows, of {', '.join(ORT_BASELINES)}")
    parser.add_argument("--out", default=str(RESULTS / "gpu"), help="results path without suffix")
    args = parser.parse_args()
    work = Path(args.work)
    models = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    out = Path(args.out)
    if args.command in ("prepare", "all"):
        prepare(work, models, batches, args.target, reuse=args.reuse,
                variants=tuple(v.strip() for v in args.variants.split(",")))
    if args.command == "pack":
        pack(work, Path(args.bundle), cases=[c for c in args.cases.split(",") if c] or None)
    if args.command == "unpack":
        _unpack_to(Path(args.bundle), work)
    if args.command == "export-onnx":
        plan = json.loads((Path(args.bundle) / "index.json").read_text())["plan"] if args.bundle else \
            json.loads((work / "plan.json").read_text())
        export_onnx(plan, Path(args.onnx_dir or work / "onnx"))
    if args.command in ("run", "all"):
        base = work
        if args.bundle and args.command == "run":
            base = Path(os.environ.get("TMPDIR", "/tmp")) / "forgeml-gpu-bench"
            _say(f"unpacking {args.bundle} into {base}")
            _unpack_to(Path(args.bundle), base)
        results = run(base, out, args.repeat, args.budget_s, torch_baseline=not args.no_torch,
                      memory=not args.no_memory, onnx_dir=Path(args.onnx_dir) if args.onnx_dir else None,
                      isolate=tuple(v.strip() for v in args.isolate.split(",") if v.strip()),
                      ort_baselines=tuple(v.strip() for v in args.ort_baselines.split(",") if v.strip()))
        print(markdown(results))
    if args.command == "mem":
        print(json.dumps(measure_memory(args.engine, models[0], batches[0], args.precision, args.artifact)))
    if args.command == "report":
        print(markdown(json.loads(out.with_suffix(".json").read_text())))


if __name__ == "__main__":
    main()
