"""Clustering: k selection, determinism, planted groups, scopes and the clusters.json format."""

import numpy as np
import pytest
import torch
from test_detect import PLANTED_LAYERS, TRIGGERS, planted_model, planted_prompts, small_config

from nestune.cluster import cluster_neurons, load_clusters, run_cluster, standardise_rows
from nestune.detect import run_detect
from nestune.errors import NestuneError
from nestune.io import read_json
from nestune.runfolder import RunFolder


def two_groups(n_a=5, n_b=4, prompts=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(prompts, generator=g), torch.randn(prompts, generator=g)
    rows = [a * (i + 1) + 0.05 * torch.randn(prompts, generator=g) for i in range(n_a)]
    rows += [b * (i + 2) + 3 + 0.05 * torch.randn(prompts, generator=g) for i in range(n_b)]
    return torch.stack(rows)


def test_two_groups_give_two_clusters():
    labels, k, silhouettes = cluster_neurons(two_groups(), k_max=6, seed=0, n_init=5)
    assert k == 2
    assert labels.tolist() == [0] * 5 + [1] * 4  # ids in order of first appearance
    assert set(silhouettes) == {2, 3, 4, 5, 6}
    assert silhouettes[2] == max(silhouettes.values())


def test_tiny_sets_are_one_cluster():
    for n in (0, 1, 2):
        labels, k, silhouettes = cluster_neurons(torch.randn(n, 10), 8, 0, 3)
        assert labels.tolist() == [0] * n and k == 1 and silhouettes == {}


def test_identical_profiles_are_one_cluster():
    profiles = torch.arange(10.0).repeat(6, 1) * torch.arange(1.0, 7.0)[:, None]  # same shape, other scales
    labels, k, _ = cluster_neurons(profiles, 4, 0, 3)
    assert k == 1 and labels.tolist() == [0] * 6


def test_k_is_capped_by_neuron_count():
    _, _, silhouettes = cluster_neurons(two_groups(2, 2), k_max=8, seed=0, n_init=3)
    assert set(silhouettes) <= {2, 3}


def test_standardise_rows_keeps_constant_rows_zero():
    x = standardise_rows(np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0]]))
    assert (x[0] == 0).all()
    assert abs(x[1].mean()) < 1e-12 and abs(x[1].std() - 1) < 1e-12


def test_clustering_is_deterministic():
    profiles = torch.randn(40, 25, generator=torch.Generator().manual_seed(1))
    a = cluster_neurons(profiles, 6, 7, 4)
    b = cluster_neurons(profiles, 6, 7, 4)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------------------
# The stage on planted neurons


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted-cluster")
    harmful, benign = planted_prompts()
    run_detect(small_config(), RunFolder(path), loaded=planted_model(), harmful=harmful, benign=benign)
    return path


def _run(detected, tmp_path, scope: str):
    """A copy of the detected run, clustered with the given scope."""
    import shutil

    shutil.copytree(detected / "detect", tmp_path / "detect")
    run = RunFolder(tmp_path)
    cfg = small_config()
    cfg.cluster.scope = scope
    return run, run_cluster(cfg, run)


def _cluster_of(entry: dict, key: str = "clusters") -> dict[int, int]:
    return dict(zip(entry["rows"], entry[key]))


@pytest.mark.parametrize("scope", ["module", "layer", "global"])
def test_planted_groups_form_one_cluster_each(detected, tmp_path, scope):
    run, summary = _run(detected, tmp_path, scope)
    clusters = load_clusters(run)
    group_a, group_b = TRIGGERS.values()
    for layer in PLANTED_LAYERS:
        for kind in ("gate", "up"):
            entry = clusters[f"layers.{layer}.{kind}"]
            assert sorted(set(entry["clusters"])) == list(range(entry["k"]))  # local ids 0..k-1
            of = _cluster_of(entry)
            ids_a, ids_b = {of[r] for r in group_a}, {of[r] for r in group_b}
            assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b
            if scope != "module":  # the pooled ids agree across targets of one group too
                shared = _cluster_of(entry, "group_clusters")
                assert len({shared[r] for r in group_a}) == 1
    assert summary["total_clusters"] == sum(e["k"] for e in clusters.values())
    assert (run.path / "cluster" / "cluster_sizes.png").exists()


def test_layer_scope_shares_ids_across_gate_and_up(detected, tmp_path):
    run, _ = _run(detected, tmp_path, "layer")
    clusters = load_clusters(run)
    layer = PLANTED_LAYERS[0]
    gate, up = clusters[f"layers.{layer}.gate"], clusters[f"layers.{layer}.up"]
    assert gate["group"] == up["group"] == f"layers.{layer}"
    row = TRIGGERS["~"][0]
    assert _cluster_of(gate, "group_clusters")[row] == _cluster_of(up, "group_clusters")[row]


def test_clusters_json_format(detected, tmp_path):
    run, summary = _run(detected, tmp_path, "module")
    data = read_json(run.path / "cluster" / "clusters.json")
    neurons = read_json(run.path / "detect" / "neurons.json")
    selected = {n: e["selected"] for n, e in neurons["targets"].items() if e["selected"]}
    assert set(data["targets"]) == set(selected)
    for name, entry in data["targets"].items():
        assert entry["rows"] == selected[name]
        assert len(entry["clusters"]) == len(entry["rows"])
    sizes = data["size_histogram"]
    assert sum(int(s) * n for s, n in sizes.items()) == data["total_neurons"] == neurons["total_selected"]
    assert summary["trainable_params"] == sum(e["k"] for e in data["targets"].values()) * 32
    assert read_json(run.path / "cluster" / "DONE.json")["total_clusters"] == data["total_clusters"]


def test_cluster_is_deterministic(detected, tmp_path):
    run_a, _ = _run(detected, tmp_path / "a", "module")
    run_b, _ = _run(detected, tmp_path / "b", "module")
    assert load_clusters(run_a) == load_clusters(run_b)


def test_unknown_scope(detected, tmp_path):
    with pytest.raises(NestuneError, match="scope"):
        _run(detected, tmp_path, "everything")


def test_cluster_needs_detect(tmp_path):
    with pytest.raises(NestuneError, match="detect"):
        run_cluster(small_config(), RunFolder(tmp_path))
