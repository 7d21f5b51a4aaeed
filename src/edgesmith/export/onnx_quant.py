"""ONNX Runtime int8: quantize a float ONNX model several ways, measure each, keep the best.

Variants are named ``<format>-<granularity>-<calibration>-<activations><weights>[-rr]``, e.g.
``qdq-channel-minmax-u8s8`` (QDQ format, per-channel weights, MinMax calibration, uint8 activations,
int8 weights) or ``qoperator-tensor-entropy-s8s8-rr`` (``-rr``: reduce_range, 7-bit weights); and
``dynamic-matmul`` (dynamic quantization of MatMul/Gemm only: ConvInteger, which the CPU provider
runs ten times slower than float Conv, is never produced).

Which variants work depends on the CPU. On x86 without VNNI, ONNX Runtime multiplies uint8 x int8
with ``vpmaddubsw``, whose 16-bit sums saturate: full-range int8 weights then change many
predictions (69% agreement on MobileNetV2), and 7-bit weights (``reduce_range``) avoid it. With VNNI
(``avx512_vnni``/``avx_vnni``) the sums are 32-bit and ``reduce_range`` only costs precision (on the
CIFAR-10 MobileNet here: 92.0% agreement with it, 94.7% without). Per-tensor weights fail on
depthwise convolutions whose channels differ in range by orders of magnitude (16.6%). So the
defaults are per-channel, and ``-rr`` exactly when the CPU lacks VNNI (:func:`default_variants`).

Selection: every variant is calibrated on the first part of the calibration samples and measured on
the rest (held out from calibration): top-1 agreement with the float model first; among variants
within ``slack`` of the best agreement, the fastest at batch 1 wins.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ExportValidationError, ModelError
from edgesmith.export.validate import predict_in_batches
from edgesmith.recipe import ExportConfig

log = logging.getLogger(__name__)
FORMATS = ("qdq", "qoperator")
GRANULARITIES = ("tensor", "channel")
CALIBRATIONS = ("minmax", "entropy", "percentile")
TYPE_PAIRS = ("u8s8", "s8s8", "u8u8")
DYNAMIC = "dynamic-matmul"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni")
HELD_OUT_FRACTION = 1 / 3
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class OnnxQuantVariant:
    """One way to quantize with ONNX Runtime, parsed from its name."""

    name: str
    format: str = "qdq"
    per_channel: bool = True
    calibration: str = "minmax"
    activations: str = "uint8"
    weights: str = "int8"
    reduce_range: bool = False

    @property
    def dynamic(self) -> bool:
        return self.name == DYNAMIC


def parse_variant(name: str) -> OnnxQuantVariant:
    """``qdq-channel-minmax-u8s8[-rr]`` or ``dynamic-matmul`` -> :class:`OnnxQuantVariant`."""
    if name == DYNAMIC:
        return OnnxQuantVariant(name, format="dynamic", calibration="none")
    parts = name.split("-")
    reduce_range = parts[-1] == "rr"
    parts = parts[:-1] if reduce_range else parts
    if (len(parts) != 4 or parts[0] not in FORMATS or parts[1] not in GRANULARITIES
            or parts[2] not in CALIBRATIONS or parts[3] not in TYPE_PAIRS):
        raise ModelError(
            f"ONNX int8 variant {name!r} is not valid; write <{'|'.join(FORMATS)}>-<{'|'.join(GRANULARITIES)}>-"
            f"<{'|'.join(CALIBRATIONS)}>-<{'|'.join(TYPE_PAIRS)}>[-rr] or {DYNAMIC}"
        )
    types = {"u8": "uint8", "s8": "int8"}
    return OnnxQuantVariant(name, parts[0], parts[1] == "channel", parts[2], types[parts[3][:2]],
                            types[parts[3][2:]], reduce_range)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether the CPU has 8-bit dot-product instructions with 32-bit sums (no int16 saturation)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in VNNI_FLAGS)


def default_variants(flags: set[str] | None = None, *, has_conv: bool = True) -> list[str]:
    """The variants worth trying on this CPU (see the module docstring for why).

    ``dynamic-matmul`` only for a model without convolutions: it would leave every Conv in float.
    QOperator with int8 activations is left out: ONNX Runtime has no fast kernel for it (40 ms against
    1 ms for QDQ on the CIFAR-10 MobileNet here).
    """
    suffix = "" if has_vnni(flags) else "-rr"
    static = ["qdq-channel-minmax-u8s8", "qdq-channel-percentile-u8s8", "qdq-channel-entropy-u8s8",
              "qdq-channel-minmax-s8s8", "qoperator-channel-minmax-u8s8"]
    return [name + suffix for name in static] + ([] if has_conv else [DYNAMIC])


@dataclass
class VariantResult:
    """How one variant did on the held-out samples (or why it failed)."""

    name: str
    top1_agreement: float | None = None
    mean_abs_diff: float | None = None
    latency_ms: float | None = None
    bytes: int | None = None
    seconds: float = 0.0
    outcome: str = ""


@dataclass
class OnnxQuantReport:
    """Every variant's numbers, the one kept and why the others lost."""

    chosen: str
    vnni: bool
    calibration_samples: int
    held_out_samples: int
    slack: float
    variants: list[VariantResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_input_layout(samples: np.ndarray, input_shape: list[Any]) -> np.ndarray:
    """NHWC samples in the ONNX model's input layout (transposed to NCHW when the model wants it)."""
    channels = samples.shape[-1]
    if len(input_shape) == 4 and input_shape[1] == channels and input_shape[-1] != channels:
        return np.ascontiguousarray(samples.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(samples, dtype=np.float32)


def _reader(input_name: str, samples: np.ndarray) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class SampleReader(CalibrationDataReader):
        """Feeds the calibration samples in batches, in the model's input layout."""

        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            size = _even_batch(len(samples))
            self._batches = iter([{input_name: samples[i : i + size]} for i in range(0, len(samples), size)])

    return SampleReader()


def _even_batch(count: int) -> int:
    """The largest batch size up to CALIBRATION_BATCH that divides ``count``.

    The histogram calibrators (Entropy, Percentile) stack the batches and fail on a ragged last one.
    """
    return max(size for size in range(1, CALIBRATION_BATCH + 1) if count % size == 0)


def _quantize_variant(variant: OnnxQuantVariant, source: Path, target: Path, input_name: str,
                      samples: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if variant.dynamic:
        quantize_dynamic(source, target, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    else:
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        quantize_static(
            source, target, _reader(input_name, samples),
            quant_format=QuantFormat.QDQ if variant.format == "qdq" else QuantFormat.QOperator,
            per_channel=variant.per_channel, reduce_range=variant.reduce_range,
            activation_type=types[variant.activations], weight_type=types[variant.weights],
            calibrate_method=methods[variant.calibration],
        )
    check_no_conv_integer(target)


def check_no_conv_integer(path: str | Path) -> None:
    """Raise :class:`ExportValidationError` if ``path`` holds ConvInteger (slow on the CPU provider)."""
    import onnx

    found = [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "ConvInteger"]
    if found:
        raise ExportValidationError(
            f"{path}: {len(found)} ConvInteger nodes ({', '.join(found[:3])}); ONNX Runtime's CPU provider runs "
            "them far slower than float Conv: quantize convolutions statically (QDQ) instead"
        )


def _batch1_latency_ms(runner: Any, sample: np.ndarray, runs: int = 40) -> float:
    from edgesmith.bench.measure import measure_latency

    return measure_latency(runner.latency_call(sample), warmup=10, runs=runs)["latency_p50_ms"]


def _measure(path: Path, held_out: np.ndarray, reference: np.ndarray, result: VariantResult) -> None:
    from edgesmith.runtime import load_runner

    runner = load_runner(path)
    got = predict_in_batches(runner, held_out)
    result.top1_agreement = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
    result.mean_abs_diff = float(np.abs(got - reference).mean())
    result.latency_ms = round(_batch1_latency_ms(runner, held_out[:1]), 3)
    result.bytes = path.stat().st_size


def _pick(results: list[VariantResult], slack: float) -> VariantResult:
    """Best agreement first; among variants within ``slack`` of it, the fastest. Records why each lost."""
    measured = [r for r in results if r.top1_agreement is not None]
    if not measured:
        raise ExportValidationError("no ONNX int8 variant could be made: " +
                                    "; ".join(f"{r.name}: {r.outcome}" for r in results))
    best_agreement = max(r.top1_agreement for r in measured)
    contenders = [r for r in measured if r.top1_agreement >= best_agreement - slack]
    chosen = min(contenders, key=lambda r: (r.latency_ms, -r.top1_agreement))
    for r in measured:
        if r is chosen:
            r.outcome = "kept: " + ("best agreement" if len(contenders) == 1 else
                                    f"fastest of {len(contenders)} within {slack:.1%} of the best agreement")
        elif r in contenders:
            r.outcome = f"lost: slower ({r.latency_ms:.2f} ms vs {chosen.latency_ms:.2f} ms) at equal agreement"
        else:
            r.outcome = (f"lost: agreement {r.top1_agreement:.2%} more than {slack:.1%} below the best "
                         f"{best_agreement:.2%}")
    return chosen


def quantize_onnx(float_path: str | Path, out_path: str | Path, calibration: np.ndarray, cfg: ExportConfig,
                  *, variants: list[str] | None = None, keep_dir: str | Path | None = None) -> OnnxQuantReport:
    """Quantize ``float_path`` every way in ``variants``, measure each, write the best to ``out_path``.

    Args:
        float_path: the float ONNX model.
        out_path: where the chosen int8 model is written.
        calibration: preprocessed training samples (N, H, W, C); the first two thirds calibrate,
            the last third is held out to compare the variants.
        cfg: ``onnx_int8_variants`` (empty: :func:`default_variants` for this CPU) and ``onnx_int8_slack``.
        variants: overrides ``cfg.onnx_int8_variants``.
        keep_dir: also keep every variant's model there as ``<variant>.onnx`` (for benchmarks).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgesmith.runtime import load_runner

    float_path, out_path = Path(float_path), Path(out_path)
    names = variants or cfg.onnx_int8_variants or default_variants(has_conv=_has_conv(float_path))
    parsed = [parse_variant(name) for name in names]
    session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    samples = to_input_layout(np.asarray(calibration, dtype=np.float32), model_input.shape)
    split = len(samples) - max(1, round(len(samples) * HELD_OUT_FRACTION)) if len(samples) > 1 else 1
    calibrate, held_out = samples[:split], samples[split:] if len(samples) > 1 else samples
    reference = predict_in_batches(load_runner(float_path), held_out)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-onnx-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        # symbolic shape inference needs sympy; a CNN's shapes are static apart from the batch
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        for variant in parsed:
            results.append(_try_variant(variant, prepared, Path(work), model_input.name, calibrate, held_out,
                                        reference))
        chosen = _pick(results, cfg.onnx_int8_slack)
        shutil.copyfile(Path(work) / f"{chosen.name}.onnx", out_path)
        if keep_dir is not None:
            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            for made in Path(work).glob("*.onnx"):
                if made.name != "prepared.onnx":
                    shutil.copyfile(made, Path(keep_dir) / made.name)
    report = OnnxQuantReport(chosen.name, has_vnni(), len(calibrate), len(held_out), cfg.onnx_int8_slack, results)
    log.info("ONNX int8: kept %s (agreement %.2f%%, %.2f ms)", chosen.name, 100 * chosen.top1_agreement,
             chosen.latency_ms)
    return report


def _has_conv(path: Path) -> bool:
    import onnx

    return any(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def _try_variant(variant: OnnxQuantVariant, prepared: Path, work: Path, input_name: str, calibrate: np.ndarray,
                 held_out: np.ndarray, reference: np.ndarray) -> VariantResult:
    result = VariantResult(variant.name)
    target = work / f"{variant.name}.onnx"
    started = time.perf_counter()
    try:
        _quantize_variant(variant, prepared, target, input_name, calibrate)
        _measure(target, held_out, reference, result)
    except Exception as exc:  # one variant failing (an ORT error, ConvInteger) must not stop the others
        result.outcome = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        log.warning("ONNX int8 variant %s failed: %s", variant.name, exc)
    result.seconds = round(time.perf_counter() - started, 1)
    return result
