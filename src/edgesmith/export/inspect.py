"""Read a .tflite flatbuffer and tell which operators compute in float.

An "int8 only" export must run every operator on integers. The converter may quietly leave an
operator in float (no integer kernel, a hybrid dynamic-range op, a float16 weight dequantized at
run time); only the file itself says what will run. The schema reader ships with ai-edge-litert, so
no TensorFlow is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import ExportValidationError, ModelError

FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16")


@dataclass(frozen=True)
class OpInfo:
    """One operator of the main subgraph, with the types of the tensors it writes."""

    index: int
    name: str
    output_types: tuple[str, ...]
    output_names: tuple[str, ...]
    io_boundary: bool  # a DEQUANTIZE writing a model output (the float side of float I/O)

    @property
    def computes_in_float(self) -> bool:
        return not self.io_boundary and any(t in FLOAT_TYPES for t in self.output_types)

    def describe(self) -> str:
        outputs = ", ".join(f"{n!r} {t.lower()}" for n, t in zip(self.output_names, self.output_types, strict=True))
        return f"{self.name} (operator {self.index}, writes {outputs})"


def _schema():  # noqa: ANN202 (a generated module)
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _names(enum_class: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def read_ops(path: str | Path) -> list[OpInfo]:
    """The operators of a .tflite file's main subgraph, in execution order."""
    schema = _schema()
    data = Path(path).read_bytes()
    if not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise ModelError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    op_names, type_names = _names(schema.BuiltinOperator), _names(schema.TensorType)
    graph_outputs = set(graph.OutputsAsNumpy().tolist())
    ops = []
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        if name == "CUSTOM" and code.CustomCode():
            name = f"CUSTOM:{code.CustomCode().decode()}"
        outputs = [i for i in op.OutputsAsNumpy().tolist() if i >= 0]
        tensors = [graph.Tensors(i) for i in outputs]
        boundary = name == "DEQUANTIZE" and set(outputs) <= graph_outputs
        ops.append(OpInfo(index, name, tuple(type_names[t.Type()] for t in tensors),
                          tuple(t.Name().decode() for t in tensors), boundary))
    return ops


def float_ops(path: str | Path) -> list[OpInfo]:
    """The operators of ``path`` that compute in float (the float-I/O DEQUANTIZE at the outputs excepted).

    The float-I/O QUANTIZE at the inputs writes an integer tensor, so it is never listed.
    """
    return [op for op in read_ops(path) if op.computes_in_float]


def check_integer_only(path: str | Path) -> int:
    """Raise :class:`ExportValidationError` naming every float operator left in ``path``.

    Returns:
        The number of operators checked.
    """
    ops = read_ops(path)
    left = [op for op in ops if op.computes_in_float]
    if left:
        shown = "; ".join(op.describe() for op in left[:8]) + ("; ..." if len(left) > 8 else "")
        raise ExportValidationError(
            f"{path}: not integer only: {len(left)} of {len(ops)} operators compute in float: {shown}. "
            "Use a full-integer format with representative data, or quantize these layers (QAT)"
        )
    return len(ops)
