"""forgeml vs ONNX Runtime on architectures nobody here wrote: Hugging Face transformers models, built
from their config classes with seeded random weights (nothing is downloaded), exported with forgeml's
exporter, compiled untuned for x86-64 (O2, compile-time verification against ONNX Runtime on), and timed
against ONNX Runtime on the same inputs with the same thread count. Each engine runs in a process of its
own (forgeml.bench.worker) and the two alternate in blocks of 10 calls, as in benchmarks/cpu.py.

    python benchmarks/real_models.py                        # the real run (about 7 min on 2 cores)
    python benchmarks/real_models.py --quick --repeat 10    # tiny configs: proves the pipeline, measures nothing
    python benchmarks/real_models.py --models resnet50,vit --threads 4
    python benchmarks/real_models.py --models vit,bert --kernels 2   # per-kernel tables of both

After the timing, the models with the highest ratio (`--kernels N`, default 3) are profiled per kernel
(forgeml.bench.kernels: forgeml's kernels beside ONNX Runtime's ops), tables at the end of the report.

Writes benchmarks/results/real_models.md and .json (raw samples); `--quick` writes real_models_quick.* in
the temporary directory instead, so that a smoke test never stands in for the committed results.
A model that fails to build, export, compile or run gets its one-line error in the table; the run goes on.

Batch 1 everywhere; text models take int64 token ids of length 128 (no attention mask: all tokens
attend), image models 1x3x224x224. Each model returns its last hidden state. The models, and what each
stresses:

- bert: BertModel, bert-base geometry (hidden 768, 12 heads, FFN 3072, vocab 30522), 12 layers, seq 128:
  the plain encoder - embedding Gather, GEMMs of 128x768x768 and 128x768x3072, batched attention
  matmuls, softmax, LayerNorm, erf-GELU.
- gpt2: GPT2Model, distilgpt2 geometry (GPT-2 small width, 6 layers, vocab 50257), seq 128: Conv1D
  (transposed-weight GEMMs), fused QKV projection split three ways, the causal mask (a where over a
  triangular constant), tanh-GELU.
- distilbert: DistilBertModel with its default config (distilbert-base: 6 layers, 768), seq 128: the
  encoder again, written differently (no token types, its own attention reshapes).
- roberta: RobertaModel, distilroberta-base geometry (6 layers, 768, vocab 50265, 514 positions),
  seq 128: position ids computed from the input (cumsum over a not-padding mask) before the Gather.
- vit: ViTModel, ViT-B/16 geometry (224x224, patch 16, hidden 768) with 6 of its 12 layers: a strided
  16x16 patch convolution, a concat with the class token, then GEMMs on 197 tokens (not a multiple of
  the register tile).
- resnet50: ResNetModel, resnet-50 (bottleneck, depths 3-4-6-3, widths 256-2048): dense 1x1 and 3x3
  convolutions, BatchNorm folded into them, ReLU, max pool: the classic conv net.
- convnext_tiny: ConvNextModel with its default config (convnext-tiny: depths 3-3-9-3, widths
  96-768): 7x7 depthwise convolutions, channels-last LayerNorm (transposes around it), 1x1 convs as
  Linear layers on NHWC tensors, GELU, layer scale.
- regnety_400mf: RegNetModel, RegNetY-400MF (widths 48-104-208-440, depths 1-3-6-6, group width 8):
  grouped 3x3 convolutions with 8 channels a group, squeeze-excitation.
- mobilenet_v2: MobileNetV2Model with its default config (width 1.0, 224): inverted residuals, 3x3
  depthwise convolutions, ReLU6 (a Clip), small 1x1 convs at low resolution.
- efficientnet_b0: EfficientNetModel, EfficientNet-B0 (width and depth 1.0, 224, head 1280): depthwise
  3x3 and 5x5 convolutions, squeeze-excitation (global pool, two tiny 1x1 convs, sigmoid, broadcast
  multiply), SiLU.

Weights are transformers' own initialisation (`_init_weights`), seeded, except for mobilenet_v2 and
efficientnet_b0: there it draws every convolution (and EfficientNet's BatchNorm scales) from N(0, 0.02),
and the activations shrink layer by layer to denormals and zero (outputs of 1e-21 and 1e-40 at 224x224),
which would make the verification vacuous and time denormal arithmetic. Their conv and linear weights
are redrawn Kaiming-normal (fan-in, seeded) and BatchNorm scales set to 1, biases to 0.

Sizes are chosen so that the whole default run (build, export, compile with verification, 10 warm-up
and 40 timed calls per engine) stays under 10 minutes on 2 cores: at --repeat 10 it took 5.5 min on a
busy 2-core AVX-512 EPYC, so about 7 min with the default 40. Layer counts were cut where noted (the
same kernels, fewer repeats of them).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SEQ, IMAGE = 128, 224
QUICK_SEQ, QUICK_IMAGE = 16, 32


@dataclass(frozen=True)
class RealModel:
    """One benchmark model: the transformers class and a config for the real and the quick run."""

    cls: str  # a transformers model class name
    kind: str  # "text" (int64 input_ids) or "image" (float pixel_values)
    config: Callable[[bool], Any]  # quick -> a transformers config
    kaiming: bool = False  # redraw conv and linear weights Kaiming-normal (see the module docstring)


def _text_config(name: str, **real: Any) -> Callable[[bool], Any]:
    """A text model's config: `real` as given, or a 2-layer width-32 one for --quick."""

    def make(quick: bool) -> Any:
        import transformers

        cls = getattr(transformers, name)
        if not quick:
            return cls(**real)
        small = {"GPT2Config": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=1000),
                 "DistilBertConfig": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=1000)}
        return cls(**small.get(name, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=1000)))

    return make


def _config(name: str, real: dict[str, Any], quick: dict[str, Any]) -> Callable[[bool], Any]:
    """An image model's config from keyword arguments for the real and the quick run."""

    def make(is_quick: bool) -> Any:
        import transformers

        return getattr(transformers, name)(**(quick if is_quick else real))

    return make


MODELS: dict[str, RealModel] = {
    "bert": RealModel("BertModel", "text", _text_config("BertConfig", num_hidden_layers=12)),
    "gpt2": RealModel("GPT2Model", "text", _text_config("GPT2Config", n_layer=6)),
    "distilbert": RealModel("DistilBertModel", "text", _text_config("DistilBertConfig")),
    "roberta": RealModel("RobertaModel", "text", _text_config(
        "RobertaConfig", num_hidden_layers=6, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "vit": RealModel("ViTModel", "image", _config(
        "ViTConfig", dict(image_size=IMAGE, patch_size=16, num_hidden_layers=6),
        dict(image_size=QUICK_IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64))),
    "resnet50": RealModel("ResNetModel", "image", _config(
        "ResNetConfig", dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                             layer_type="bottleneck"),
        dict(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck"))),
    "convnext_tiny": RealModel("ConvNextModel", "image", _config(
        "ConvNextConfig", {}, dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))),
    "regnety_400mf": RealModel("RegNetModel", "image", _config(
        "RegNetConfig", dict(embedding_size=32, hidden_sizes=[48, 104, 208, 440], depths=[1, 3, 6, 6],
                             groups_width=8, layer_type="y"),
        dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], groups_width=8,
             layer_type="y"))),
    "mobilenet_v2": RealModel("MobileNetV2Model", "image", _config(
        "MobileNetV2Config", dict(image_size=IMAGE), dict(depth_multiplier=0.35, image_size=QUICK_IMAGE)),
        kaiming=True),
    "efficientnet_b0": RealModel("EfficientNetModel", "image", _config(
        "EfficientNetConfig", dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=IMAGE, hidden_dim=1280),
        dict(width_coefficient=0.25, depth_coefficient=0.25, image_size=QUICK_IMAGE, hidden_dim=320)),
        kaiming=True),
}


def build(name: str, quick: bool, seed: int = 0) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, str], int]:
    """The model `name` with seeded weights, wrapped to return its last hidden state; its input shapes,
    input dtypes and parameter count."""
    import torch
    import transformers

    spec = MODELS[name]
    torch.manual_seed(seed)
    config = spec.config(quick)
    config._attn_implementation = "eager"  # attention as the model's own matmuls and softmax, not SDPA
    model = getattr(transformers, spec.cls)(config).eval()

    class LastHiddenState(torch.nn.Module):
        """The model's last_hidden_state as the one output."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).last_hidden_state

    if spec.kaiming:
        for layer in model.modules():
            if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(layer, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(layer.weight)
                torch.nn.init.zeros_(layer.bias)
    params = sum(p.numel() for p in model.parameters())
    if spec.kind == "text":
        return LastHiddenState(model), {"input_ids": (1, QUICK_SEQ if quick else SEQ)}, {"input_ids": "int64"}, params
    size = QUICK_IMAGE if quick else IMAGE
    return LastHiddenState(model), {"pixel_values": (1, 3, size, size)}, {}, params


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:240]}"


def bench_model(name: str, quick: bool, threads: int, repeat: int, workdir: Path) -> dict[str, Any]:
    """Build, export, compile and time one model; a failure is recorded with the stage it happened in."""
    from forgeml import compile_model
    from forgeml.bench.harness import Stats, measure_in_workers, paired_ratio
    from forgeml.compiler.frontend.torch_export import export_module
    from forgeml.compiler.verify import seeded_inputs

    row: dict[str, Any] = {"model": name, "class": MODELS[name].cls}
    stage = "build"
    try:
        module, shapes, dtypes, row["params"] = build(name, quick)
        row["inputs"] = {k: [list(v), dtypes.get(k, "float32")] for k, v in shapes.items()}
        stage = "export"
        start = time.perf_counter()
        onnx_path = export_module(module, shapes, workdir / f"{name}.onnx", input_dtypes=dtypes)
        row["export_s"] = round(time.perf_counter() - start, 1)
        del module
        gc.collect()
        stage = "compile"
        start = time.perf_counter()
        manifest = compile_model(onnx_path, workdir / f"{name}.fml", target="x86-64", opt_level="O2",
                                 verify=True, use_tuning_db=False)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["verification"] = manifest.verification
        stage = "measure"
        feeds = seeded_inputs(manifest.inputs, seed=0)  # token ids over the whole vocabulary (valid_range)
        engines = {"forgeml": ("forgeml", workdir / f"{name}.fml"), "onnxruntime": ("onnxruntime", onnx_path)}
        print(f"[{name}] compiled in {row['compile_s']} s; timing forgeml and onnxruntime, a worker process "
              "each", file=sys.stderr, flush=True)
        for label, (times, worker) in measure_in_workers(engines, feeds, threads, repeat=repeat).items():
            row[label] = {"stats": asdict(Stats.of(times)), "samples_ms": [t * 1e3 for t in times], "worker": worker}
        row["ratio_p50"] = row["forgeml"]["stats"]["p50_ms"] / row["onnxruntime"]["stats"]["p50_ms"]
        row["ratio_paired"] = paired_ratio(row["forgeml"]["samples_ms"], row["onnxruntime"]["samples_ms"])
        row["_files"] = (str(workdir / f"{name}.fml"), str(onnx_path))  # for the kernel profiles; not saved
    except Exception as err:  # noqa: BLE001 (one model's failure is a result, not the end of the run)
        row["error"] = f"{stage}: {_one_line(err)}"
        print(f"[{name}] {row['error']}", file=sys.stderr, flush=True)
    return row


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    """The results table, the geometric mean of the ratios, the machine and the command."""
    ratios = [r["ratio_p50"] for r in rows if "ratio_p50" in r]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    paired = [r["ratio_paired"] for r in rows if r.get("ratio_paired")]
    paired_geomean = math.exp(sum(map(math.log, paired)) / len(paired)) if paired else float("nan")
    title = "# Real models (Hugging Face transformers architectures): forgeml untuned vs ONNX Runtime"
    lines = [title, ""]
    if args.quick:
        lines += ["**`--quick`: tiny configs (width 32 or so, 2 layers, seq 16, 32x32 images). This proves the "
                  "pipeline runs end to end; the times are NOT a measurement.**", ""]
    lines += [
        f"Machine: {machine['cpu']} ({machine['arch']}, {machine['cores']} cores; vector ISA: "
        f"{', '.join(machine['vector_features']) or 'none detected'}); Python {machine['python']}. "
        f"{args.threads} intra-op threads for both engines; {args.repeat} timed calls each after 10 warm-up, "
        "alternating in blocks of 10 on the same seeded inputs, each engine in a process of its own. "
        "forgeml: untuned (rule-based schedules, tuning database not consulted), x86-64, O2. "
        "Ratio: forgeml p50 / ONNX Runtime p50 (below 1: forgeml faster); paired: the median over the "
        "alternation rounds of (forgeml's block median / ONNX Runtime's in the same round), which cancels the "
        "machine's slow speed drifts. Max error: largest absolute "
        "difference from ONNX Runtime in compile-time verification (relative to the output's scale in "
        "the JSON).",
        "",
        f"Command: `python benchmarks/real_models.py --threads {args.threads} --repeat {args.repeat}"
        f" --models {args.models} --kernels {args.kernels}{' --quick' if args.quick else ''}`",
        "",
        "| model | class | params (M) | forgeml p50 ms | forgeml p10 ms | ORT p50 ms | ORT p10 ms | ratio p50 "
        "| paired | compile s | max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}" if "params" in r else "-"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['class']} | {params} | failed: {r['error'].replace('|', '/')} "
                         "| | | | | | | |")
            continue
        f, o, v = r["forgeml"]["stats"], r["onnxruntime"]["stats"], r["verification"]
        err = f"skipped ({v['skipped']})" if v.get("skipped") else f"{v['max_abs_error']:.2g}"
        lines.append(f"| {r['model']} | {r['class']} | {params} | {_ms(f['p50_ms'])} | {_ms(f['p10_ms'])} | "
                     f"{_ms(o['p50_ms'])} | {_ms(o['p10_ms'])} | {r['ratio_p50']:.2f}x | "
                     f"{r['ratio_paired']:.2f}x | {r['compile_s']:.1f} "
                     f"| {err} |")
    lines += ["", f"Geometric mean of the ratios over the {len(ratios)} models measured: {geomean:.2f}x "
                  f"(paired: {paired_geomean:.2f}x).", ""]
    profiled = [r for r in rows if "kernels" in r]
    if profiled:
        from forgeml.bench.kernels import method, section

        runs = profiled[0]["kernels"]["runs"]
        lines += ["## Where the time goes: the slowest models per kernel", "",
                  f"The {len(profiled)} models with the highest ratio, profiled after the timing. "
                  + method(args.threads, runs), ""]
        for r in profiled:
            lines += section(f"{r['model']} ({r['ratio_p50']:.2f}x)", r["kernels"], args.kernel_rows)
    return "\n".join(lines)


def profile_slowest(rows: list[dict[str, Any]], count: int, threads: int) -> None:
    """Kernel profiles (`row["kernels"]`) of the `count` models with the highest ratio; a profile that
    fails leaves its one-line error instead."""
    from forgeml.bench.kernels import profile_pair

    timed = sorted((r for r in rows if "ratio_p50" in r), key=lambda r: -r["ratio_p50"])
    for row in timed[:count]:
        print(f"[{row['model']}] kernel profiles", file=sys.stderr, flush=True)
        try:
            row["kernels"] = profile_pair(*row["_files"], threads=threads)
        except Exception as err:  # noqa: BLE001 (the timing stands without the profile)
            row["kernels_error"] = _one_line(err)
            print(f"[{row['model']}] kernel profile: {row['kernels_error']}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated; known: {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both engines")
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per engine (after 10 warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny configs: a smoke test, not a measurement")
    parser.add_argument("--out", default=None, help="output path without suffix (default results/real_models)")
    parser.add_argument("--kernels", type=int, default=3, metavar="N",
                        help="per-kernel tables for the N models with the highest ratio (0: none)")
    parser.add_argument("--kernel-rows", type=int, default=10, help="kernels per table")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    from forgeml.bench.harness import machine_info

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgeml-real-models-") as tmp:
        for name in names:
            rows.append(bench_model(name, args.quick, args.threads, args.repeat, Path(tmp)))
        profile_slowest(rows, args.kernels, args.threads)
    for row in rows:
        row.pop("_files", None)
    machine = machine_info()
    default = Path(tempfile.gettempdir()) / "real_models_quick" if args.quick else RESULTS / "real_models"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    ratios = [r["ratio_p50"] for r in rows if "ratio_p50" in r]
    report = {"machine": machine,
              "settings": {"threads": args.threads, "repeat": args.repeat, "warmup": 10, "block": 10,
                           "quick": args.quick, "target": "x86-64", "opt_level": "O2", "tuned": False,
                           "isolation": "process per engine, alternating blocks of 10",
                           "total_s": round(time.perf_counter() - start, 1)},
              "geomean_ratio_p50": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
              "models": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(rows, machine, args)
    text += f"Whole run (build, export, compile, timing): {report['settings']['total_s']:.0f} s.\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out.with_suffix('.md')} and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
