"""Join a network's ONNX graph with a scikit-learn model's (skl2onnx) into ONE ONNX file.

The network part (a Keras model whose output is the scikit-learn model's input: an embedding, or the
members' concatenated probabilities) goes through tf2onnx, the scikit-learn part through skl2onnx with the
same default-domain opset, and ``onnx.compose.merge_models`` wires the first graph's output into the
second's input. Both graphs must import the same opset for every domain they share (``ai.onnx`` and
``ai.onnx.ml``) and have the same IR version, so both are pinned here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import MissingDependencyError
from edgesmith.runs import atomic_path

ML_OPSET = 3
PREFIX = "skl_"  # names of the scikit-learn graph get it, so nothing clashes with the network's names
INPUT_NAME = "input"


def network_onnx(model: Any, opset: int) -> Any:
    """tf2onnx graph of a Keras model with one float32 input named ``input`` and a dynamic batch."""
    import tf2onnx

    from edgesmith._keras import tf

    signature = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    return proto


def sklearn_onnx(estimator: Any, n_features: int, opset: int) -> Any:
    """skl2onnx graph of a fitted classifier: input ``features`` (N, n_features) -> ``probabilities``."""
    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise MissingDependencyError("skl2onnx is needed to export scikit-learn ensemble parts: "
                                     "pip install 'skl2onnx>=1.20,<1.21'") from None
    return to_onnx(estimator, initial_types=[("features", FloatTensorType([None, n_features]))],
                   target_opset={"": opset, "ai.onnx.ml": ML_OPSET},
                   options={id(estimator): {"zipmap": False}})


def _align(model: Any, opsets: dict[str, int], ir_version: int) -> Any:
    import onnx

    kept = {imp.domain: imp.version for imp in model.opset_import}
    kept.update({domain: version for domain, version in opsets.items() if domain in kept or domain == ""})
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in kept.items())
    model.ir_version = ir_version
    return model


def join(network: Any, estimator: Any, *, opset: int) -> Any:
    """One ONNX model: ``input`` -> network -> estimator -> ``skl_probabilities`` (N, classes)."""
    import onnx
    from onnx import compose

    net = network_onnx(network, opset)
    skl = sklearn_onnx(estimator, int(network.output_shape[-1]), opset)
    opsets = {"": opset, "ai.onnx.ml": ML_OPSET}
    ir = max(net.ir_version, skl.ir_version)
    net, skl = _align(net, opsets, ir), _align(skl, opsets, ir)
    merged = compose.merge_models(net, skl, io_map=[(net.graph.output[0].name, "features")],
                                  outputs=[f"{PREFIX}probabilities"], prefix2=PREFIX)
    onnx.checker.check_model(merged)
    return merged


def write_joined(network: Any, estimator: Any, path: str | Path, *, opset: int = 17) -> Path:
    """Write :func:`join`'s model atomically to ``path``."""
    import onnx

    with atomic_path(path) as tmp:
        onnx.save(join(network, estimator, opset=opset), str(tmp))
    return Path(path)


def in_process(network: Any, estimator: Any, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The same pipeline run in-process (Keras, then scikit-learn): the reference the ONNX file must match."""
    features = network.predict(inputs, batch_size=batch_size, verbose=0)
    return estimator.predict_proba(features.astype(np.float32))
