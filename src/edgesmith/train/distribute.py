"""Distribution strategies (tf.distribute) and mixed precision for the train stage.

``train.strategy`` names one of :data:`edgesmith.recipe.STRATEGIES`:

- ``auto``: MirroredStrategy when this machine has more than one GPU, else TensorFlow's default strategy;
- ``none``: the default strategy (one device);
- ``mirrored``: MirroredStrategy over this machine's GPUs (or its CPU);
- ``multiworker``: MultiWorkerMirroredStrategy over the machines listed in the ``TF_CONFIG`` environment variable;
- ``tpu``: TPUStrategy on the TPU this machine can reach.

``train.batch_size`` is per replica: the global batch is ``batch_size * replicas``.
A strategy is created once per process (:func:`strategy_for` caches it): MultiWorkerMirroredStrategy must
be created before TensorFlow runs its first operation, so the CLI creates it right after reading the recipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from edgesmith._keras import keras, tf
from edgesmith.errors import StrategyError
from edgesmith.recipe import STRATEGIES

log = logging.getLogger(__name__)
TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
)
_created: dict[str, tf.distribute.Strategy] = {}


def strategy_for(name: str) -> tf.distribute.Strategy:
    """The strategy named ``name`` (see the module docstring), created on first use and then reused.

    Raises:
        StrategyError: ``name`` is unknown, TF_CONFIG is missing or invalid (``multiworker``), no TPU is
            reachable (``tpu``), or ``multiworker`` is asked for after TensorFlow already ran operations.
    """
    if name not in STRATEGIES:
        raise StrategyError(f"train.strategy = {name!r} is not a strategy; choose from {', '.join(STRATEGIES)}")
    if name not in _created:
        _created[name] = _CREATORS[name]()
        strategy = _created[name]
        log.info("strategy %s: %s with %d replica(s)", name, type(strategy).__name__, strategy.num_replicas_in_sync)
    return _created[name]


def gpu_count() -> int:
    return len(tf.config.list_physical_devices("GPU"))


def _auto() -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy() if gpu_count() > 1 else tf.distribute.get_strategy()


def _multiworker() -> tf.distribute.Strategy:
    cluster_from_tf_config(os.environ.get("TF_CONFIG"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        if "program startup" not in str(exc):
            raise
        raise StrategyError(
            "train.strategy = 'multiworker' must be set up before TensorFlow runs anything: call "
            "edgesmith.train.distribute.strategy_for('multiworker') at the start of the program (the CLI does)"
        ) from None


def _tpu() -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StrategyError(
            f"train.strategy = 'tpu': no TPU found ({reason}); run on a TPU VM (or set TPU_NAME), "
            "or use --strategy auto"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


_CREATORS = {
    "auto": _auto,
    "none": tf.distribute.get_strategy,
    "mirrored": tf.distribute.MirroredStrategy,
    "multiworker": _multiworker,
    "tpu": _tpu,
}


def cluster_from_tf_config(text: str | None) -> tuple[list[str], str, int]:
    """The workers (``host:port``), this task's type and index from a TF_CONFIG value, checked.

    Raises:
        StrategyError: TF_CONFIG is unset, not JSON, or its cluster or task is malformed.
    """
    if not text:
        raise StrategyError(
            "train.strategy = 'multiworker' needs the TF_CONFIG environment variable on every worker, e.g. "
            f"TF_CONFIG='{TF_CONFIG_EXAMPLE}' (the same cluster everywhere, each worker its own index)"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StrategyError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}); "
                            f"expected e.g. {TF_CONFIG_EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise StrategyError(f"TF_CONFIG needs a 'cluster' and a 'task' object, got {text[:200]}; "
                            f"expected e.g. {TF_CONFIG_EXAMPLE}")
    workers = [*cluster.get("chief", []), *cluster.get("worker", [])]
    if not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise StrategyError(f"TF_CONFIG cluster must list workers as 'host:port' strings, got {cluster}")
    kind, index = task.get("type"), task.get("index", 0)
    tasks = cluster.get(kind) if kind in ("chief", "worker") else None
    if not isinstance(tasks, list) or not isinstance(index, int) or not 0 <= index < len(tasks):
        raise StrategyError(f"TF_CONFIG task {task} does not name one of the cluster's tasks "
                            f"({', '.join(f'{k}: {len(v)}' for k, v in cluster.items())}); "
                            "set task.type to 'worker' (or 'chief') and task.index to this worker's position")
    return workers, kind, index


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def shard_by_data(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy) -> tf.data.Dataset:
    """Under multi-worker training, shard the (identically ordered) batches across workers, not files.

    Every worker builds the same seeded pipeline; each then takes its own share of every global batch.
    """
    if not is_multiworker(strategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def precision_policy(mixed_precision: bool) -> str:
    """``mixed_float16`` when asked for and a GPU is present; otherwise ``float32`` (with a warning on CPU)."""
    if not mixed_precision:
        return "float32"
    if gpu_count() == 0:
        log.warning("train.mixed_precision = true needs a GPU (float16 on a CPU is slower, not faster); "
                    "training in float32")
        return "float32"
    return "mixed_float16"


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
    """Keras's global dtype policy set to ``policy`` inside the block, restored after it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def with_float32_output(model: keras.Model) -> keras.Model:
    """The same graph with its output layer rebuilt in float32 (softmax in float16 loses precision)."""
    last = model.layers[-1]
    output_layer = type(last).from_config({**last.get_config(), "dtype": "float32"})
    outputs = output_layer(last.input)
    output_layer.set_weights(last.get_weights())
    return keras.Model(model.input, outputs, name=model.name)


def copy_into(source: keras.Model, target: keras.Model) -> keras.Model:
    """``target`` (same architecture) with ``source``'s weights and per-layer trainable flags."""
    for mine, theirs in zip(target.layers, source.layers, strict=True):
        mine.trainable = theirs.trainable
        mine.set_weights(theirs.get_weights())
    return target


def describe(strategy: tf.distribute.Strategy, name: str, batch_size: int, policy: str) -> dict[str, Any]:
    """What the manifest records about how training was distributed."""
    replicas = strategy.num_replicas_in_sync
    return {"strategy": name, "strategy_class": type(strategy).__name__, "replicas": replicas,
            "batch_size_per_replica": batch_size, "global_batch_size": batch_size * replicas,
            "precision_policy": policy}
