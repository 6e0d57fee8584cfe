"""Rates with bootstrap confidence intervals.

Every reported rate is `{"rate": r, "ci": [lo, hi], "n": n}`: the mean of 0/1 outcomes and its 95%
percentile bootstrap interval (resampling the items with replacement), so small evaluation sets show
how little they can tell apart.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of the values; the interval is the percentile bootstrap of the mean."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1 or n_boot <= 0:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # Percentiles of a discrete bootstrap can miss the mean by rounding; the interval always holds it.
    return mean, float(min(lo, mean)), float(max(hi, mean))


def rate(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"rate", "ci", "n"} for 0/1 (or bool) outcomes."""
    values = [float(v) for v in values]
    mean, lo, hi = bootstrap_ci(values, n_boot, seed)
    return {"rate": mean, "ci": [lo, hi], "n": len(values)}


def accuracy(values, n_boot: int = 1000, seed: int = 0) -> dict:
    """Like `rate`, under the key a utility table reads: {"acc", "ci", "n"}."""
    r = rate(values, n_boot, seed)
    return {"acc": r["rate"], "ci": r["ci"], "n": r["n"]}


# ---------------------------------------------------------------------------------------------------------
# Changes, before -> after, paired by item

def paired_change(before: dict, after: dict, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """{"change", "ci", "n"}: the mean of after - before over the items both sides scored ({item: value}).

    The bootstrap resamples items with their two outcomes together, so an item that kept its outcome adds
    no noise: the interval is much narrower than the gap between the two rates' own intervals suggests,
    and says whether a change of a point or two is real on this many items.
    """
    items = [k for k in before if k in after]
    if not items:
        return None
    mean, lo, hi = bootstrap_ci([float(after[k]) - float(before[k]) for k in items], n_boot, seed)
    return {"change": mean, "ci": [lo, hi], "n": len(items)}


def outcome_changes(before: dict, after: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired changes of every headline rate, from two evaluations' per-item outcomes (evaluate.run.outcomes).

    Attack success pairs behaviours on the attacks both sides ran: a behaviour's share of successful
    attacks for the mean, its any-attack outcome, and each attack's outcome.
    """
    b_att, a_att = before.get("attacks") or {}, after.get("attacks") or {}
    names = [a for a in next(iter(b_att.values()), {}) if all(a in v for v in (*b_att.values(), *a_att.values()))]

    def per_behaviour(side: dict, fn) -> dict:
        return {k: fn([v[a] for a in names]) for k, v in side.items()} if names else {}

    def share(outcomes: list[int]) -> float:
        return sum(outcomes) / len(outcomes)

    b_share, a_share = per_behaviour(b_att, share), per_behaviour(a_att, share)
    source_of = before.get("attack_sources") or {}  # absent from evaluations made before it was kept
    sources = sorted(set(source_of.values()))

    def of_source(shares: dict, src: str) -> dict:
        return {k: v for k, v in shares.items() if source_of.get(k) == src}

    changes = {
        "asr_mean": paired_change(b_share, a_share, n_boot, seed),
        "asr_by_source": {src: paired_change(of_source(b_share, src), of_source(a_share, src), n_boot, seed)
                          for src in sources} if len(sources) > 1 else {},
        "asr_any_attack": paired_change(per_behaviour(b_att, max), per_behaviour(a_att, max), n_boot, seed),
        "asr_by_attack": {a: paired_change({k: v[a] for k, v in b_att.items()}, {k: v[a] for k, v in a_att.items()},
                                           n_boot, seed) for a in names},
        "overrefusal": paired_change(before.get("overrefusal") or {}, after.get("overrefusal") or {}, n_boot, seed),
        "utility": {t: paired_change(v, (after.get("utility") or {}).get(t) or {}, n_boot, seed)
                    for t, v in (before.get("utility") or {}).items()},
        "gsm8k": paired_change(before.get("gsm8k") or {}, after.get("gsm8k") or {}, n_boot, seed),
    }
    changes["utility"] = {t: c for t, c in changes["utility"].items() if c}
    return changes
