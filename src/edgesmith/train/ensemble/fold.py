"""Fold network members and a linear combiner into ONE flat Keras graph.

Shared input -> every member's layers (renamed ``m<i>_<name>``, weights copied) side by side ->
Concatenate -> the combiner as a Dense layer. Members that share their frozen lower layers (see
:class:`edgesmith.train.ensemble.members.BoundaryCache`) can share them in the graph too (``shared_cut``):
the trunk runs once and only the upper parts are side by side, which makes the file smaller and faster
while computing exactly the same function. The result is a plain functional model, so optimize, export
and bench treat it like any other.
"""

from __future__ import annotations

from typing import Any

from edgesmith._keras import keras, tf
from edgesmith.errors import ModelError
from edgesmith.train.ensemble.combine import LinearCombiner
from edgesmith.train.ensemble.members import EMBEDDING_LAYER, check_shared_lower


@keras.utils.register_keras_serializable(package="edgesmith")
class MirrorImage(keras.layers.Layer):
    """Flips images left-right inside the graph (TFLite REVERSE_V2; tf2onnx converts it too)."""

    def call(self, images: Any) -> Any:
        return tf.reverse(images, axis=[2])


def mirror_view(model: keras.Model) -> keras.Model:
    """``model`` applied to the left-right mirrored image: a test-time view that needs no training.

    A flat functional model (same weights, copied), so it folds into an ensemble like any member.
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    flipped = MirrorImage(name="mirror")(inputs)
    return keras.Model(inputs, replay_layers(model, {id(model.input): flipped}, 1, ""), name=f"{model.name}_mirror")


def replay_layers(model: keras.Model, tensors: dict[int, Any], start: int, prefix: str) -> Any:
    """Re-create ``model.layers[start:]`` on new tensors (renamed with ``prefix``, weights copied).

    ``tensors`` maps ``id(original symbolic tensor)`` to the new tensor that replaces it; returns the
    new tensor for ``model.output``.
    """
    for layer in model.layers[start:]:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        config = {**layer.get_config(), "name": f"{prefix}{layer.name}"}
        twin = layer.__class__.from_config(config)
        inputs = layer.input
        args = [tensors[id(t)] for t in inputs] if isinstance(inputs, list) else tensors[id(inputs)]
        out = twin(args)
        twin.set_weights(layer.get_weights())
        tensors[id(layer.output)] = out
    return tensors[id(model.output)]


def fold_ensemble(members: list[keras.Model], combiner: LinearCombiner, *, shared_cut: int | None = None,
                  name: str = "ensemble") -> keras.Model:
    """One functional model computing ``combiner.predict_proba([m(x) for m in members])``.

    Args:
        members: classifiers with the same input shape and number of classes.
        combiner: a fitted :class:`LinearCombiner`.
        shared_cut: index of the last layer all members share unchanged (checked); None: nothing shared.
    """
    _check_compatible(members, combiner.kernel_.shape[0])
    inputs, outputs = side_by_side(members, shared_cut)
    return keras.Model(inputs, combiner_layer(outputs, combiner), name=name)


def fold_members(members: list[keras.Model], *, shared_cut: int | None = None,
                 name: str = "members") -> keras.Model:
    """One functional model whose output is the members' probabilities concatenated (N, M * classes)."""
    _check_compatible(members, None)
    inputs, outputs = side_by_side(members, shared_cut)
    joined = keras.layers.Concatenate(name="members")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, joined, name=name)


def side_by_side(members: list[keras.Model], shared_cut: int | None) -> tuple[Any, list[Any]]:
    """A shared input and every member's output on it (the trunk up to ``shared_cut`` built once)."""
    inputs = keras.Input(members[0].input_shape[1:], name="image")
    if shared_cut is None:
        return inputs, [replay_layers(m, {id(m.input): inputs}, 1, f"m{i}_") for i, m in enumerate(members)]
    for member in members[1:]:
        check_shared_lower(member, members[0], shared_cut)
    trunk = replay_layers(keras.Model(members[0].input, members[0].layers[shared_cut].output),
                          {id(members[0].input): inputs}, 1, "trunk_")
    return inputs, [replay_layers(m, {id(m.layers[shared_cut].output): trunk}, shared_cut + 1, f"m{i}_")
                    for i, m in enumerate(members)]


def embedding_model(member: keras.Model, layer: str = EMBEDDING_LAYER) -> keras.Model:
    """The member's input -> its pooled features (what the scikit-learn ensembles are fitted on)."""
    return keras.Model(member.input, member.get_layer(layer).output, name=f"{member.name}_embedding")


def combiner_layer(member_outputs: list[Any], combiner: LinearCombiner) -> Any:
    joined = keras.layers.Concatenate(name="members")(member_outputs) if len(member_outputs) > 1 else member_outputs[0]
    dense = keras.layers.Dense(combiner.kernel_.shape[1], activation="softmax" if combiner.softmax else None,
                               name=f"{combiner.kind}_combiner")
    out = dense(joined)
    dense.set_weights([combiner.kernel_, combiner.bias_])
    return out


def _check_compatible(members: list[keras.Model], combiner_inputs: int | None) -> None:
    shapes = {tuple(m.input_shape[1:]) for m in members}
    classes = {int(m.output_shape[-1]) for m in members}
    if len(shapes) != 1 or len(classes) != 1:
        raise ModelError(f"ensemble members must share one input shape and class count; got inputs {sorted(shapes)}"
                         f" and classes {sorted(classes)}; resize inputs per member is not supported")
    expected = len(members) * classes.pop()
    if combiner_inputs is not None and combiner_inputs != expected:
        raise ModelError(f"combiner was fitted on {combiner_inputs} member outputs, the ensemble has "
                         f"{expected}; refit it on these members")
