"""forgeml (O2, untuned rule schedules) vs ONNX Runtime on this CPU, side by side.

Usage (from the repo root):
    python benchmarks/ops_cpu.py                       # the three zoo models + the op set
    python benchmarks/ops_cpu.py --zoo resnet18 --rounds 12
    python benchmarks/ops_cpu.py --ops conv3x3 dense   # single-op models only
    python benchmarks/ops_cpu.py --onnx model.onnx     # any ONNX file (random float inputs)

Both run with the same number of intra-op threads (--threads, default 2); forgeml runs in this process
and ONNX Runtime in a worker process of its own (forgeml.bench.worker), since a TVM session pins the
process that runs it to core 0. Timing alternates blocks of
--n calls of each engine with a short pause between blocks, --rounds times, and reports the median (p50)
and p10 of every call. Both thread pools spin, and on a shared 2-core machine other processes disturb both
engines: compare the ratio, rerun when the load is high (it is printed). With --threads 1 the script also
prints CPU time per call, which a loaded machine disturbs much less than wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _threads_from_argv() -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 2


os.environ.setdefault("TVM_NUM_THREADS", str(_threads_from_argv()))  # before tvm starts its pool

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ZOO = ("resnet18", "mobilenet_v2", "bert_tiny")


# --------------------------------------------------------------------------------------------------
# single-op models
# --------------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, weights) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "op", inputs, outputs,
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _conv(c, hw, oc, k, stride=1, groups=1):
    rng = np.random.default_rng(0)
    pad = k // 2
    out = (hw + 2 * pad - k) // stride + 1
    w = {"W": (rng.standard_normal((oc, c // groups, k, k)) * 0.1).astype("float32"),
         "B": rng.standard_normal(oc).astype("float32")}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[k, k], pads=[pad] * 4,
                              strides=[stride] * 2, group=groups), helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, [_f("x", (1, c, hw, hw))], [_f("y", (1, oc, out, out))], w)


def _dense(m, k, n):
    rng = np.random.default_rng(0)
    w = {"W": (rng.standard_normal((k, n)) * 0.05).astype("float32"),
         "B": rng.standard_normal(n).astype("float32")}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    return _model(nodes, [_f("x", (m, k))], [_f("y", (m, n))], w)


def _softmax(shape):
    return _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [_f("x", shape)], [_f("y", shape)], {})


def _layernorm(shape):
    rng = np.random.default_rng(0)
    h = shape[-1]
    w = {"g": rng.uniform(0.5, 1.5, h).astype("float32"), "b": rng.standard_normal(h).astype("float32")}
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)]
    return _model(nodes, [_f("x", shape)], [_f("y", shape)], w)


OPS = {
    "conv3x3": lambda: _conv(64, 56, 64, 3),
    "conv3x3_s2": lambda: _conv(128, 56, 256, 3, stride=2),
    "conv1x1": lambda: _conv(96, 14, 576, 1),
    "conv7x7_stem": lambda: _conv(3, 224, 64, 7, stride=2),
    "depthwise": lambda: _conv(144, 56, 144, 3, groups=144),
    "depthwise_s2": lambda: _conv(96, 112, 96, 3, stride=2, groups=96),
    "dense": lambda: _dense(128, 768, 3072),
    "gemv": lambda: _dense(1, 512, 1000),
    "softmax": lambda: _softmax((1, 4, 128, 128)),
    "layernorm": lambda: _layernorm((1, 128, 128)),
}


# --------------------------------------------------------------------------------------------------
# compile, check, time
# --------------------------------------------------------------------------------------------------


def _random_inputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 100, shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _import(model: onnx.ModelProto):
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    if params and "main" in params:
        values = params["main"]
        fparams = mod["main"].params
        mod = relax.transform.BindParams("main", dict(zip(fparams[len(fparams) - len(values):], values)))(mod)
    return mod


def _target():
    import tvm

    from forgeml.targets.host import detect_host

    host = detect_host()
    t = {"kind": "llvm", "mcpu": host.llvm_mcpu, "num-cores": int(os.environ["TVM_NUM_THREADS"])}
    if host.arch == "x86_64":
        t["mtriple"] = "x86_64-linux-gnu"
    return tvm.target.Target(t)


def compile_forgeml(model: onnx.ModelProto, level: str = "O2"):
    """(callable running the compiled model on fixed inputs, seconds to optimize, seconds to build)."""
    import tvm
    from tvm import relax

    from forgeml.compiler import graph, pipeline

    target = _target()
    t0 = time.perf_counter()
    mod = pipeline.get_pipeline(level)(_import(model), target)
    mod, weights = graph.lift_weights(mod)
    t1 = time.perf_counter()
    ex = tvm.compile(mod, target=target)
    t2 = time.perf_counter()
    vm = relax.VirtualMachine(ex, tvm.cpu())
    w = [tvm.runtime.tensor(x) for x in weights]

    def bind(feeds):
        args = [tvm.runtime.tensor(v) for v in feeds.values()] + w
        main = vm["main"]

        def run():
            out = main(*args)
            return out if hasattr(out, "numpy") else out[0]

        return run

    return bind, t1 - t0, t2 - t1


def _cpu_ms(fn, n: int, rounds: int) -> float:
    """Lowest process CPU time per call over `rounds` blocks of `n` calls."""
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c) / n)
    return best * 1e3


def bench(name: str, model: onnx.ModelProto, feeds, threads: int, rounds: int, n: int) -> dict:
    """forgeml (compiled and run here) and ONNX Runtime in a worker process of its own
    (forgeml.bench.worker): a TVM session pins this process to core 0, which would squeeze ORT here."""
    from forgeml.bench.harness import in_process
    from forgeml.bench.worker import EngineWorker

    bind, t_opt, t_build = compile_forgeml(model)
    run_fml = bind(feeds)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    want = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = run_fml().numpy()
    err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-12))
    with tempfile.TemporaryDirectory(prefix="forgeml-ops-") as tmp:
        onnx.save(model, str(Path(tmp) / "model.onnx"))
        with EngineWorker("onnxruntime", Path(tmp) / "model.onnx", feeds, threads) as ort_worker:
            for _ in range(3):
                run_fml()
            ort_worker.run(3)
            tf, to = [], []
            for _ in range(rounds):
                tf += in_process(run_fml)(n)
                time.sleep(0.05)
                to += ort_worker.run(n)
                time.sleep(0.05)
            if threads == 1:
                # single-threaded: CPU time per call is far less disturbed by other processes than wall time
                cf = _cpu_ms(run_fml, n, rounds)
                co = min(ort_worker.cpu_time(n) for _ in range(rounds)) * 1e3
                print(f"{name:16s} 1-thread CPU time per call: forgeml {cf:8.3f} ms  ORT {co:8.3f} ms"
                      f"  ratio {cf / co:5.2f}x", flush=True)
    r = {"name": name, "fml_p50": np.median(tf) * 1e3, "fml_p10": np.percentile(tf, 10) * 1e3,
         "ort_p50": np.median(to) * 1e3, "ort_p10": np.percentile(to, 10) * 1e3, "err": err,
         "opt_s": t_opt, "build_s": t_build}
    r["ratio"] = r["fml_p50"] / r["ort_p50"]
    print(f"{name:16s} forgeml p50 {r['fml_p50']:8.3f} ms (p10 {r['fml_p10']:8.3f})  ORT p50 {r['ort_p50']:8.3f} ms"
          f" (p10 {r['ort_p10']:8.3f})  ratio {r['ratio']:5.2f}x  p10 ratio {r['fml_p10'] / r['ort_p10']:5.2f}x"
          f"  max rel err {err:.1e}  compile {t_opt:.1f}+{t_build:.1f} s  load {os.getloadavg()[0]:.1f}",
          flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", nargs="*", default=None, help=f"zoo models (default: {' '.join(ZOO)})")
    ap.add_argument("--ops", nargs="*", default=None, help=f"single-op models: {' '.join(OPS)}")
    ap.add_argument("--onnx", nargs="*", default=[], help="ONNX files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=10, help="calls per block")
    args = ap.parse_args(argv)
    if args.zoo is None and args.ops is None and not args.onnx:
        args.zoo, args.ops = list(ZOO), list(OPS)
    if args.zoo == []:
        args.zoo = list(ZOO)  # a bare --zoo means all of them
    if args.ops == []:
        args.ops = list(OPS)
    print(f"threads {args.threads}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"target {dict(_target().export())['mcpu']}, load {os.getloadavg()}", flush=True)
    for name in args.ops or []:
        model = OPS[name]()
        bench(name, model, _random_inputs(model), args.threads, args.rounds, args.n)
    for path in args.onnx:
        model = onnx.load(path)
        bench(Path(path).stem, model, _random_inputs(model), args.threads, args.rounds, args.n)
    if args.zoo:
        from forgeml import zoo

        with tempfile.TemporaryDirectory() as tmp:
            for name in args.zoo:
                path = zoo.export_zoo_model(name, Path(tmp) / f"{name}.onnx")
                model = onnx.load(str(path))
                bench(name, model, zoo.example_inputs(name), args.threads, args.rounds, args.n)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
