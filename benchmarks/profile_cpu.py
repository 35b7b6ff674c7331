"""Per-kernel profile of a model compiled by forgeml for this CPU, beside ONNX Runtime's per-node profile.

    python benchmarks/profile_cpu.py model.onnx                  # top 25 kernels of each engine
    python benchmarks/profile_cpu.py model.onnx --top 40 --runs 30 --threads 2
    python benchmarks/profile_cpu.py model.onnx --json prof.json # every kernel, for before/after diffs

forgeml: the model goes through the compiler's own path (normalize, import, x86-64 O2, untuned), runs in
the Relax VM, and an instrument times every kernel call (`VirtualMachine.set_instrument`, perf_counter
around each call; the callback itself costs a few microseconds a call, so very short kernels read
high). ONNX Runtime: `SessionOptions.enable_profiling` over the same number of runs, its per-node
`kernel_time` events. Each line is the median over runs of the summed time per kernel (forgeml) or per
node (ONNX Runtime), with the kernel's output shape; the two tables list the heaviest first. ONNX Runtime
runs first: a TVM run pins the calling thread to core 0 until forgeml's runtime restores it, and the
ORT pool would inherit that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def ort_profile(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> list[dict]:
    """[{name, op, ms, shape}] per ONNX node, median over `runs` calls, heaviest first."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="forgeml-prof-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(5 + runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    info: dict[str, dict] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        per_node[name].append(ev["dur"] / 1e3)
        args = ev.get("args", {})
        shape = args.get("output_type_shape") or []
        info[name] = {"op": args.get("op_name", "?"), "shape": [list(s.values())[0] for s in shape][:1]}
    # the first 5 calls were the session's warm-up inside the profile: keep the last `runs` of each node
    rows = []
    for name, times in per_node.items():
        rows.append({"name": name, "ms": float(np.median(times[5:] or times)), **info[name]})
    return sorted(rows, key=lambda r: -r["ms"])


def forgeml_profile(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int,
                    clock=time.perf_counter) -> tuple[list[dict], float]:
    """([{name, ms, calls, shape}] per kernel, median over `runs` model calls, heaviest first; the median
    whole-model time without the instrument)."""
    import dataclasses

    import tvm
    from tvm import relax

    from forgeml.compiler import graph, pipeline
    from forgeml.compiler.frontend import onnx_model, relax_import
    from forgeml.compiler.frontend.normalize import normalize
    from forgeml.targets.registry import resolve_target

    loaded = onnx_model.load_onnx(path, {})
    folded, _ = normalize(loaded.model)
    mod = relax_import.import_onnx(dataclasses.replace(loaded, model=folded))
    spec = resolve_target("x86-64")
    target = tvm.target.Target({**spec.tvm_target(), "num-cores": threads})
    mod = pipeline.get_pipeline("O2")(mod, target)
    mod, weights = graph.lift_weights(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feeds.values()] + [tvm.runtime.tensor(w) for w in weights]
    main = vm["main"]
    for _ in range(5):
        main(*args)
    whole = []
    for _ in range(runs):
        start = time.perf_counter()
        main(*args)
        whole.append(time.perf_counter() - start)
    per_run: list[dict[str, float]] = []
    shapes: dict[str, list] = {}
    calls: dict[str, int] = defaultdict(int)
    state = {"t": 0.0, "cur": None}

    def instrument(func, symbol, before, ret, *fargs):
        if symbol.startswith("vm.builtin"):
            return 0
        if before:
            state["t"] = clock()
            return 0
        dt = clock() - state["t"]
        state["cur"][symbol] = state["cur"].get(symbol, 0.0) + dt
        if symbol not in shapes and fargs:
            shapes[symbol] = list(getattr(fargs[-1], "shape", []))
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    for i in range(runs):
        state["cur"] = {}
        main(*args)
        per_run.append(state["cur"])
        if i == 0:
            for k in state["cur"]:
                calls[k] += 1
    names = set().union(*per_run)
    rows = [{"name": n, "ms": float(np.median([r.get(n, 0.0) for r in per_run])) * 1e3, "shape": shapes.get(n, [])}
            for n in names]
    return sorted(rows, key=lambda r: -r["ms"]), float(np.median(whole)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", type=Path, default=None, help="write every kernel's row here")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="forgeml kernels timed in CPU time of the calling thread (with --threads 1: far less "
                         "disturbed by other processes than wall time)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from forgeml.compiler.frontend import onnx_model
    from forgeml.compiler.verify import seeded_inputs

    feeds = seeded_inputs(onnx_model.load_onnx(args.onnx, {}).inputs, seed=0)
    ort_rows = [] if args.skip_ort else ort_profile(args.onnx, feeds, args.threads, args.runs)
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (worker threads' time is not counted)")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    fml_rows, whole = forgeml_profile(args.onnx, feeds, args.threads, args.runs, clock)
    fml_total = sum(r["ms"] for r in fml_rows)
    ort_total = sum(r["ms"] for r in ort_rows)
    print(f"load {os.getloadavg()[0]:.1f}; forgeml: {len(fml_rows)} kernels, sum {fml_total:.3f} ms "
          f"(whole model uninstrumented {whole:.3f} ms); ORT: {len(ort_rows)} nodes, sum {ort_total:.3f} ms")
    by_op: dict[str, float] = defaultdict(float)
    for r in ort_rows:
        by_op[r["op"]] += r["ms"]
    if by_op:
        print("ORT by op: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])))
    print(f"{'forgeml kernel':60s} {'ms':>8s}  shape")
    for r in fml_rows[: args.top]:
        print(f"{r['name'][:60]:60s} {r['ms']:8.3f}  {r['shape']}")
    if ort_rows:
        print(f"\n{'ORT node':60s} {'ms':>8s}  op / shape")
        for r in ort_rows[: args.top]:
            print(f"{r['name'][:60]:60s} {r['ms']:8.3f}  {r['op']} {r['shape']}")
    if args.json:
        args.json.write_text(json.dumps({"forgeml": fml_rows, "onnxruntime": ort_rows, "forgeml_whole_ms": whole},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
