"""Probe training on CPU: one stack of modules per core against cache-sized 8 MiB stacks (issue 7: fix what can be).

    python benchmarks/probe_stacks.py [--model smollm2-135m] [--seeds 0,1,2,3] [--repeats 2]

For each seed: the detect stage's prompts (as `nestune run --seed S` picks them), their pooled activations
captured once, then `detect.train_probes` with the default settings, alternately with stacks capped at 8 MiB
(the rule before 2026-12-06) and with one stack per core (the rule now), `--repeats` times each. Prints each
time and whether the two select the same neurons (z > the threshold). Run it on an idle machine; nothing is
written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    from nestune import data, detect
    from nestune.config import Config
    from nestune.models import ffn_targets, load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    cfg = Config(model=args.model)
    d = cfg.detect
    loaded = load_model(cfg.model, "cpu", "auto")
    targets = ffn_targets(loaded.model)
    rules = {"8 MiB stacks": 8 * 2**20, "one stack per core": detect.CPU_STACK_MAX_BYTES}
    for seed in [int(s) for s in args.seeds.split(",")]:
        harmful = detect._as_records(data.pick(d.harmful, "detect", d.n_prompts, seed), "harmful")
        benign = detect._as_records(data.pick(d.benign, "detect", d.n_prompts, seed), "benign")
        labels = torch.tensor([1] * len(harmful) + [0] * len(benign))
        heldout = detect.heldout_split(labels, d.heldout_fraction, seed)
        features = detect.capture_pooled(loaded.model, loaded.tokenizer, [r[0] for r in harmful + benign],
                                         targets, d.batch_size, d.max_length)
        times: dict[str, list[float]] = {name: [] for name in rules}
        selected: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, cap in rules.items():
                detect.CPU_STACK_MAX_BYTES = cap
                start = time.perf_counter()
                probes = detect.train_probes(features, labels, d.probe_epochs, d.probe_lr, d.probe_weight_decay,
                                             seed, heldout)
                times[name].append(time.perf_counter() - start)
                selected[name] = {t: detect.select_neurons(probes[t]["weight"], d.z_threshold, d.sign)[0].tolist()
                                  for t in probes}
        detect.CPU_STACK_MAX_BYTES = rules["one stack per core"]
        shown = ", ".join(f"{name} {' / '.join(f'{t:.1f}' for t in ts)} s" for name, ts in times.items())
        ratio = statistics.median(times["one stack per core"]) / statistics.median(times["8 MiB stacks"])
        n = sum(len(v) for v in selected["one stack per core"].values())
        same = selected["one stack per core"] == selected["8 MiB stacks"]
        print(f"seed {seed}: {shown}; per core / 8 MiB {ratio:.2f}x; {n} neurons, same selection: {same}", flush=True)


if __name__ == "__main__":
    main()
