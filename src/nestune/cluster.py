"""Cluster: group safety neurons that rise and fall together (DESIGN.md 1.2).

A neuron's profile is its pooled activation over the detection prompts, standardised per neuron, so
k-means groups neurons by the *shape* of their response, not its size. k is chosen by silhouette score over
2..k_max; fewer than 3 neurons form one cluster.

Scopes: "module" (default) clusters each target's neurons on their own; "layer" pools the gate and up
neurons of a layer; "global" pools every selected neuron. Whatever the scope, clusters.json is written per
target with cluster ids 0..k-1 local to that target: the adapter trains one update per (target, cluster),
because an update vector lives in its module's input space. A layer or global cluster that spans several
targets therefore becomes one local cluster in each. (Gate and up of one layer read the same input, so one
update could in principle be shared across them; the per-target format keeps the adapter simple, and
`group_clusters` records the pooled ids should a shared variant want them.)

Artifacts in RUN/cluster:
    clusters.json      scope, totals, and per target: rows (selected neuron indices within the target),
                       clusters (local id per row), k, silhouettes of its group, group, group_clusters
    cluster_sizes.png  histogram of cluster sizes
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch
from safetensors.torch import load_file

from .config import Config
from .errors import NestuneError
from .io import atomic_path, read_json, write_json
from .runfolder import RunFolder

SCOPES = ("module", "layer", "global")


def standardise_rows(profiles: np.ndarray) -> np.ndarray:
    """z-score each row across its columns; constant rows become zeros."""
    mean = profiles.mean(axis=1, keepdims=True)
    std = profiles.std(axis=1, keepdims=True)
    std[std == 0] = 1.0
    return (profiles - mean) / std


def first_seen_ids(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster ids 0..k-1 in order of first appearance, so equal clusterings compare equal."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(c), len(mapping)) for c in labels], dtype=np.int64)


def cluster_neurons(profiles: torch.Tensor, k_max: int, seed: int, n_init: int
                    ) -> tuple[np.ndarray, int, dict[int, float]]:
    """k-means over standardised neuron profiles (n_neurons, n_prompts), k chosen by silhouette score.

    Returns (cluster id per neuron, k, {k tried: silhouette}). Ties keep the smaller k.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = profiles.shape[0]
    if n < 3:
        return np.zeros(n, dtype=np.int64), 1, {}
    x = standardise_rows(profiles.double().cpu().numpy())
    best, best_labels, silhouettes = None, np.zeros(n, dtype=np.int64), {}
    for k in range(2, min(k_max, n - 1) + 1):
        with warnings.catch_warnings():
            # identical profiles leave k-means fewer distinct clusters than asked for; handled below
            warnings.simplefilter("ignore")
            labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
        if len(set(labels.tolist())) < 2:
            continue
        silhouettes[k] = float(silhouette_score(x, labels))
        if best is None or silhouettes[k] > silhouettes[best]:
            best, best_labels = k, labels
    if best is None:
        return np.zeros(n, dtype=np.int64), 1, silhouettes
    labels = first_seen_ids(best_labels)
    return labels, int(labels.max()) + 1, silhouettes


def groups_for(scope: str, targets: dict[str, dict]) -> dict[str, list[str]]:
    """Which targets are clustered together: {group name: [target names]}."""
    if scope == "module":
        return {name: [name] for name in targets}
    if scope == "layer":
        groups: dict[str, list[str]] = {}
        for name, entry in targets.items():
            groups.setdefault(f"layers.{entry['layer']}", []).append(name)
        return groups
    if scope == "global":
        return {"global": list(targets)}
    raise NestuneError(f"unknown cluster.scope '{scope}'", f"use one of {', '.join(SCOPES)}")


def run_cluster(cfg: Config, run: RunFolder) -> dict:
    """The cluster stage: read RUN/detect, cluster per scope, write RUN/cluster."""
    c = cfg.cluster
    if c.k_max < 1:
        raise NestuneError(f"cluster.k_max must be at least 1, not {c.k_max}", "--set cluster.k_max=8")
    det = run.require("detect", "run `nestune detect` first")
    neurons = read_json(det / "neurons.json")
    acts = load_file(str(det / "activations.safetensors"))
    selected = {name: e for name, e in neurons["targets"].items() if e["selected"]}

    out_targets: dict[str, dict] = {}
    for group, names in groups_for(c.scope, selected).items():
        # rows of the pooled profile matrix: each target's selected neurons, target after target
        profiles = torch.cat([acts[name].T for name in names])
        labels, k, silhouettes = cluster_neurons(profiles, c.k_max, cfg.seed, c.n_init)
        start = 0
        for name in names:
            rows = selected[name]["selected"]
            shared = labels[start : start + len(rows)]
            start += len(rows)
            local = first_seen_ids(shared)
            out_targets[name] = {"rows": rows, "clusters": local.tolist(), "k": int(local.max()) + 1,
                                 "silhouettes": silhouettes, "group": group, "group_k": k,
                                 "group_clusters": shared.tolist()}

    sizes = [int(n) for e in out_targets.values() for n in np.bincount(e["clusters"])]
    summary = {
        "scope": c.scope,
        "total_clusters": len(sizes),
        "total_neurons": sum(sizes),
        "n_targets": len(out_targets),
        "mean_size": sum(sizes) / len(sizes),
        "size_histogram": {str(s): n for s, n in sorted(Counter(sizes).items())},
        "trainable_params": sum(e["k"] * selected[name]["d_model"] for name, e in out_targets.items()),
    }
    out = run.stage("cluster")
    write_json(out / "clusters.json", {**summary, "k_max": c.k_max, "seed": cfg.seed, "targets": out_targets})
    plot_sizes(sizes, out / "cluster_sizes.png")
    print(f"cluster ({c.scope}): {summary['total_neurons']:,} neurons in {summary['total_clusters']} clusters "
          f"over {summary['n_targets']} modules (mean size {summary['mean_size']:.1f}, largest {max(sizes)}); "
          f"{summary['trainable_params']:,} trainable parameters", flush=True)
    run.mark_done("cluster", summary)
    return summary


def load_clusters(run: RunFolder) -> dict[str, dict]:
    """{target name: {"rows": [...], "clusters": [...], "k": int, ...}} from RUN/cluster/clusters.json."""
    return read_json(run.require("cluster", "run `nestune cluster` first") / "clusters.json")["targets"]


def plot_sizes(sizes: list[int], path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counts = Counter(sizes)
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(list(counts), list(counts.values()))
    ax.set_xlabel("neurons in cluster")
    ax.set_ylabel("clusters")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Cluster sizes")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
