"""Post-training quantization side by side: every TFLite and ONNX int8 variant of one model, on one test set.

For each format it exports (through ``edgesmith.export.export``, so every artifact is validated and
full-integer files are checked to be integer only), then measures on the whole test split: top-1,
the drop from its float32 counterpart, bytes on disk and batch-1 latency (median). Every ONNX Runtime
int8 variant is measured too, not only the one the exporter kept. An int8 TFLite file more than
``--debug-gap`` points below float32 gets the quantization debugger's worst layers printed.

    nice -n 10 python benchmarks/quantization.py                       # the fine-tuned CIFAR-10 model
    python benchmarks/quantization.py --model runs/x/train/model.keras --data path/to/images --limit 2000

A benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesmith.bench.measure import measure_latency
from edgesmith.data.datasets import image_folder, limit_per_class
from edgesmith.data.pipeline import load_pixels
from edgesmith.data.spec import PreprocessSpec
from edgesmith.export import export
from edgesmith.export.debug import debug_quantization, gap_exceeds
from edgesmith.export.onnx_quant import cpu_flags, has_vnni
from edgesmith.export.validate import predict_in_batches
from edgesmith.recipe import ONNX_INT8_VARIANTS, ExportConfig
from edgesmith.runtime import load_keras_model, load_runner
from edgesmith.workflow import preprocessed_samples

TFLITE_FORMATS = ["tflite-float32", "tflite-int8-float-io", "tflite-int8", "tflite-uint8", "tflite-int16x8"]
ONNX_VARIANTS = ["qdq-channel-minmax-u8s8", "qdq-channel-minmax-s8s8", "qdq-channel-minmax-s8s8-rr",
                 "qdq-channel-percentile-u8s8", "qdq-channel-entropy-u8s8", "qoperator-channel-minmax-u8s8",
                 "qdq-tensor-minmax-u8s8"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/cifar10/train/model.keras", help="Keras model, preprocess.json beside")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"),
                   help="image folder with train/ and test/")
    p.add_argument("--limit", type=int, default=0, help="test images per class (0: all)")
    p.add_argument("--calibration", type=int, default=600, help="training images for calibration")
    p.add_argument("--formats", default=",".join(TFLITE_FORMATS + ["onnx-float32", "onnx-int8"]))
    p.add_argument("--onnx-variants", default=",".join(ONNX_VARIANTS), help="ONNX int8 variants to measure")
    p.add_argument("--threads", type=int, default=1, help="threads for the latency runs")
    p.add_argument("--debug-gap", type=float, default=1.0, help="points below float32 that trigger the debugger")
    p.add_argument("--out", default="", help="folder for the artifacts (default: a temporary folder)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def batch1_ms(path: Path, sample: np.ndarray, threads: int, runs: int = 200) -> float:
    call = load_runner(path, threads=threads).latency_call(sample)
    return measure_latency(call, warmup=30, runs=runs)["latency_p50_ms"]


def top1(path_or_model: object, inputs: np.ndarray, labels: np.ndarray) -> float:
    from edgesmith.runtime import KerasRunner

    runner = KerasRunner(path_or_model) if not isinstance(path_or_model, Path) else load_runner(path_or_model)
    return float(np.mean(predict_in_batches(runner, inputs, batch_size=100).argmax(-1) == labels))


def measure(name: str, path: Path, inputs: np.ndarray, labels: np.ndarray, threads: int, **extra: object) -> dict:
    row = {"name": name, "top1": top1(path, inputs, labels), "bytes": path.stat().st_size,
           "p50_ms": batch1_ms(path, inputs[:1], threads), **extra}
    print(f"  {name:34s} top-1 {row['top1']:.4f}  {row['bytes'] / 1e6:6.2f} MB  {row['p50_ms']:7.2f} ms", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or tempfile.mkdtemp(prefix="edgesmith-quant-"))
    spec = PreprocessSpec.load_beside(args.model)
    model = load_keras_model(args.model)
    data = image_folder(args.data)
    test = limit_per_class(data.test, args.limit, 0) if args.limit else data.test
    pixels, labels = load_pixels(test, spec.input_size)
    inputs = spec.normalize(pixels).astype(np.float32)
    del pixels
    calibration = preprocessed_samples(data, spec, "train", args.calibration, 42)
    checks = inputs[:: max(1, len(inputs) // 500)][:500]
    variants = [v for v in args.onnx_variants.split(",") if v]
    unknown = [v for v in variants if v not in ONNX_INT8_VARIANTS]
    if unknown:
        print(f"unknown ONNX int8 variants: {', '.join(unknown)}", file=sys.stderr)
        return 2
    cfg = ExportConfig(onnx_int8_variants=variants)
    print(f"{len(inputs)} test images, {len(calibration)} calibration images, CPU VNNI: {has_vnni()}, "
          f"avx512f: {'avx512f' in cpu_flags()}, latency threads: {args.threads}", flush=True)
    keras_top1 = top1(model, inputs, labels)
    print(f"  {'keras float32':34s} top-1 {keras_top1:.4f}", flush=True)
    rows, results = [], {}
    for fmt in args.formats.split(","):
        started = time.perf_counter()
        result = export(model, fmt, cfg, spec=spec, out_dir=out, name=fmt.replace("-", "_"),
                        calibration=calibration, validation_inputs=checks)
        results[fmt] = result
        extra = {"format": fmt, "export_s": round(time.perf_counter() - started, 1),
                 "agreement_500": result.validation.top1_agreement}
        if fmt == "onnx-int8":
            extra["kept"] = result.details["chosen"]
        rows.append(measure(fmt, result.path, inputs, labels, args.threads, **extra))
    if "onnx-int8" in results:
        rows += onnx_variant_rows(model, results["onnx-int8"], cfg, calibration, out, inputs, labels, args.threads)
    debug_rows(model, rows, calibration, checks, args.debug_gap)
    print_table(rows, keras_top1)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


def onnx_variant_rows(model: object, result: object, cfg: ExportConfig, calibration: np.ndarray, out: Path,
                      inputs: np.ndarray, labels: np.ndarray, threads: int) -> list[dict]:
    """Every ONNX int8 variant, re-made and kept this time, measured on the whole test split."""
    from edgesmith.export.onnx_quant import quantize_onnx

    folder = out / "onnx_variants"
    report = quantize_onnx(out / "onnx_float32.onnx", out / "onnx_int8_again.onnx", calibration, cfg,
                           keep_dir=folder)
    rows = []
    for variant in report.variants:
        path = folder / f"{variant.name}.onnx"
        if path.is_file():
            rows.append(measure(f"  onnx {variant.name}", path, inputs, labels, threads, format="onnx-int8 variant",
                                agreement_held_out=variant.top1_agreement, outcome=variant.outcome))
        else:
            print(f"  onnx {variant.name}: {variant.outcome}")
    return rows


def debug_rows(model: object, rows: list[dict], calibration: np.ndarray, checks: np.ndarray, gap: float) -> None:
    base = next((r["top1"] for r in rows if r["name"] == "tflite-float32"), None)
    for row in rows:
        if base is None or row["name"] not in ("tflite-int8", "tflite-int8-float-io", "tflite-uint8"):
            continue
        if gap_exceeds(base, row["top1"], gap):
            report = debug_quantization(model, calibration, checks)
            row["debug"] = report
            worst = ", ".join(f"{r['tensor']} ({r['rmse_over_scale']:.2f})" for r in report.get("layers", []))
            print(f"  {row['name']}: {100 * (base - row['top1']):.2f} points below float32; worst layers: "
                  f"{worst or report.get('error')}")


def print_table(rows: list[dict], keras_top1: float) -> None:
    floats = {"tflite": next((r["top1"] for r in rows if r["name"] == "tflite-float32"), None),
              "onnx": next((r["top1"] for r in rows if r["name"] == "onnx-float32"), None)}
    float_ms = next((r["p50_ms"] for r in rows if r["name"] == "onnx-float32"), None)
    print(f"\nKeras float32 top-1: {keras_top1:.4f}\n")
    print("| artifact | top-1 | vs float32 (points) | MB | batch-1 p50 ms | vs ONNX float32 latency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kind = "onnx" if "onnx" in r["name"] else "tflite"
        ref = floats[kind]
        delta = f"{100 * (r['top1'] - ref):+.2f}" if ref is not None else ""
        speed = f"{float_ms / r['p50_ms']:.2f}x" if kind == "onnx" and float_ms else ""
        size = f"{r['bytes'] / 1e6:.2f}"
        print(f"| {r['name'].strip()} | {r['top1']:.4f} | {delta} | {size} | {r['p50_ms']:.2f} | {speed} |")


if __name__ == "__main__":
    sys.exit(main())
