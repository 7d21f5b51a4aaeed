"""Clustering, 2:4 sparsity and the collaborative chains (prune -> PQAT, cluster -> CQAT) on the tiny model.

Each structure is checked where it must survive: in the exported full-integer TFLite file, read back
from its int8 kernels (``optimize.check.kernel_stats``), not only in the Keras weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import accuracy
from edgesmith.optimize import cluster, optimize, prune
from edgesmith.recipe import OptimizeConfig

TUNED = ["block0_conv", "block1_conv", "head_dense", "predictions"]


def config(**values) -> OptimizeConfig:
    # The tiny model is trained from scratch, so every fine-tune runs the whole model on images (seconds);
    # 50% of its few weights need ~3 epochs at 3e-3 to recover (1 epoch at 1e-3 left it at ~0.6).
    base = {"finetune_samples": 0, "batch_size": 32, "prune_epochs": 3, "prune_learning_rate": 3e-3,
            "cluster_epochs": 2, "cluster_learning_rate": 1e-3, "qat_learning_rate": 1e-3, "check_samples": 200}
    return OptimizeConfig(**{**base, **values})


@pytest.fixture(scope="module")
def collaborative(trained_tiny, digits_data):
    cfg = config(techniques=["prune", "prune_qat", "cluster", "cluster_qat"], sparsity=0.5, clusters=16)
    return optimize(trained_tiny.model, digits_data, cfg, spec=trained_tiny.spec, seed=0, mirror=False)


def test_clustering_leaves_at_most_k_values_per_kernel(trained_tiny, digits_data, tiny_test_inputs):
    clustered, report = cluster(trained_tiny.model, digits_data, config(clusters=16), spec=trained_tiny.spec,
                                seed=0, mirror=False)
    for name in TUNED:
        assert np.unique(clustered.get_layer(name).get_weights()[0]).size <= 16, name
    assert set(report["unique_values_per_layer"]) == set(TUNED)
    assert set(report["skipped_layers"]) == {"block0_bn", "block1_bn"}
    assert all("normalization statistics" in why for why in report["skipped_layers"].values())
    assert not any("ClusterWeights" in type(layer).__name__ for layer in clustered.layers)  # stripped
    assert accuracy(clustered, *tiny_test_inputs) > 0.7


def test_two_of_four_sparsity_zeroes_two_of_every_four_input_weights(trained_tiny, digits_data):
    pruned, report = prune(trained_tiny.model, digits_data, config(prune_structure="2:4"), spec=trained_tiny.spec,
                           seed=0, mirror=False)
    kernel = pruned.get_layer("head_dense").get_weights()[0]  # (inputs, units): blocks of 4 along the inputs
    blocks = kernel.reshape(-1, 4, kernel.shape[-1])
    assert np.all(np.sum(blocks != 0, axis=1) <= 2)
    assert report["sparsity_per_layer"]["head_dense"] == pytest.approx(0.5, abs=0.01)
    assert "2:4" in report["latency_note"] and "no latency gain" in report["latency_note"]


def test_unstructured_pruning_claims_no_latency_gain(collaborative):
    note = collaborative.report["prune"]["latency_note"]
    assert "not latency" in note


def test_pruned_sparsity_is_in_the_int8_file(collaborative):
    check = collaborative.report["prune"]["int8_check"]
    assert check["int8_sparsity_overall"] == pytest.approx(0.5, abs=0.05)
    assert check["int8_gzip_bytes"] < check["int8_bytes"]


def test_prune_preserving_qat_keeps_the_sparsity_through_int8(collaborative):
    report = collaborative.report["prune_qat"]
    assert report["after"] == "prune" and report["scheme"] == "Default8BitPrunePreserveQuantizeScheme"
    check = report["int8_check"]
    assert check["int8_sparsity_overall"] == pytest.approx(0.5, abs=0.05)  # plain QAT would refill the zeros
    assert check["int8_tflite_top1"] > 0.7


def test_cluster_preserving_qat_keeps_k_values_per_channel_through_int8(collaborative):
    report = collaborative.report["cluster_qat"]
    assert report["after"] == "cluster"
    check = report["int8_check"]
    assert 2 <= check["int8_max_unique_values_per_channel"] <= 16
    assert check["int8_tflite_top1"] > 0.7


def test_plain_qat_int8_file_has_many_values_per_channel(trained_tiny, digits_data):
    """The control of the two tests above: without clustering an int8 kernel uses far more than 16 values."""
    result = optimize(trained_tiny.model, digits_data, config(techniques=["qat"]), spec=trained_tiny.spec, seed=0,
                      mirror=False)
    check = result.report["qat"]["int8_check"]
    assert check["int8_max_unique_values_per_channel"] > 16
    assert check["int8_sparsity_overall"] < 0.1


def test_run_saves_and_exports_every_technique(tmp_path, trained_tiny):
    """Through the run directory: each technique's model is saved, loads back and ships as int8 TFLite."""
    from conftest import run_with_trained, tiny_recipe
    from edgesmith.workflow import OPTIMIZED_NAMES, bench_artifacts, run_stage

    techniques = list(OPTIMIZED_NAMES)
    recipe = tiny_recipe(optimize={**{k: v for k, v in vars(config()).items() if k in (
        "finetune_samples", "batch_size", "prune_learning_rate", "cluster_learning_rate", "qat_learning_rate")},
        "techniques": techniques, "check_samples": 0, "clusters": 16},
        export={"formats": ["tflite-float32", "tflite-int8"], "validation_samples": 100,
                "min_top1_agreement_quantized": 0.5})
    run = run_with_trained(tmp_path / "run", trained_tiny, recipe)
    optimized = run_stage("optimize", run.path)["outputs"]
    assert {"pruned", "qat", "clustered", "pruned_qat", "clustered_qat_int8"} <= set(optimized)
    exported = run_stage("export", run.path)["outputs"]
    shipped = {**exported, **optimized}
    for name in OPTIMIZED_NAMES.values():
        assert (run.path / shipped[f"{name}_int8"]["path"]).stat().st_size > 0, name
    assert {f"{name}_int8" for name in OPTIMIZED_NAMES.values()} <= set(bench_artifacts(run, recipe))
