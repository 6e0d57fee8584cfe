"""Detect: find the feed-forward neurons that respond to harmful prompts (DESIGN.md 1.1).

1. Capture: run harmful and benign prompts (chat template, generation prompt) through the decoder and
   record, for every neuron, the projection's output (before the activation function) max-pooled over the
   prompt's real tokens. Padding is set to -inf before the max, so it can never decide a value.
   (detect.pool = "last", our option, takes the value at the last prompt token instead.)
2. Probe: one logistic regression per module, harmful = 1, benign = 0, trained as batched tensor programs.
   Features are standardised per neuron over the training prompts, so a probe weight measures how much
   a neuron's *relative* activity tells harmful from benign, not how large its activations happen to be;
   that makes weights of one module comparable for the z-score below.
3. Select: z-score the probe weights within the module; safety neurons have z > threshold.

Artifacts in RUN/detect:
    probes.safetensors       <name>.weight, <name>.z, <name>.bias, <name>.mean, <name>.std for every target
                             (mean/std: the feature standardisation, so a probe can score new activations)
    activations.safetensors  <name>: pooled activations of the selected neurons, (n_prompts, n_selected),
                             for targets with a selection; `labels`: 1 harmful, 0 benign, per prompt
    neurons.json             totals, per-target FFNTarget fields + selection + probe AUC, and the prompts
    neurons_per_layer.png    safety neurons per layer, stacked by module kind
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .config import Config
from .errors import NestuneError
from .io import atomic_path, read_json, save_tensors, write_json
from .models import (
    FFNTarget,
    LoadedModel,
    encode_chat,
    ffn_targets,
    get_module,
    input_device,
    position_ids,
    with_batch_backoff,
)
from .runfolder import RunFolder

SIGNS = ("positive", "negative", "both")
POOLS = ("max", "last")

# ---------------------------------------------------------------------------------------------------------
# Capture


@contextmanager
def add_hooks(hooks: list[tuple[nn.Module, object]]):
    """Register forward hooks for the duration of a block; they are removed even if the block raises."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, tokens, 1): 0 where mask (batch, tokens) is 1, -inf at padding."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, float("-inf"))[..., None]


def masked_max(values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Max over the token axis of (batch, tokens, n), padding left out by adding its `padding_bias`.

    The bias is built once per batch; one add and a max per hook measured ~3% faster capture on smollm2 than
    a masked_fill with the mask inverted in every hook (BENCHMARKS.md, "Activation capture").
    """
    return (values + bias.to(values.device)).amax(dim=1)


def capture_pooled(model, tokenizer, texts: list[str], targets: list[FFNTarget], batch_size: int,
                   max_length: int, pool: str = "max") -> dict[str, torch.Tensor]:
    """Pooled pre-activation outputs of every target's neurons: {name: float32 CPU (n_prompts, n_neurons)}.

    pool "max": the largest value over the prompt's real tokens; "last": the value at the last token (prompts
    are left-padded, so that is position -1 of every row).
    """
    from tqdm.auto import tqdm

    # Batches of similar length waste less compute on padding, longest first so that an out-of-memory error
    # comes at once; results go back to the caller's order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    current = {}  # the batch's attention mask, read by the hooks
    pooled: dict[str, list[torch.Tensor]] = {}

    def hook_for(target: FFNTarget):
        def hook(module, args, output):
            values = output[..., target.offset : target.offset + target.n_neurons]
            if pool == "last":
                values = values[:, -1]
            else:
                values = masked_max(values, current["bias"])
            pooled[target.name].append(values.float().cpu())

        return hook

    hooks = [(get_module(model, t.module_path), hook_for(t)) for t in targets]
    body = getattr(model, "base_model", model)  # the decoder without the LM head: its logits are not needed
    device = input_device(model)

    def capture(size: int) -> None:
        pooled.update({t.name: [] for t in targets})  # a retry with a smaller batch starts over
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        show = len(batches) > 1  # shown in logs too, as the other stages do
        with torch.inference_mode(), add_hooks(hooks):
            for batch in tqdm(batches, desc="capturing activations", unit="batch", disable=not show):
                enc = encode_chat(tokenizer, [texts[i] for i in batch], max_length, device=device)
                current["bias"] = padding_bias(enc["attention_mask"], model.dtype)
                body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     position_ids=position_ids(enc["attention_mask"]), use_cache=False)

    with_batch_backoff(capture, batch_size, "capturing activations")

    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    out = {}
    for t in targets:
        values = torch.cat(pooled[t.name])[inverse]
        if not torch.isfinite(values).all():
            raise NestuneError(
                f"activations of {t.module_path} are not finite (NaN or inf) on some prompts",
                "load the model in float32 or bfloat16 (--set dtype=fp32); float16 overflows in many models",
            )
        out[t.name] = values
    return out


# ---------------------------------------------------------------------------------------------------------
# Probes

# On CPU the probes are small matrix-vector products, bound by memory bandwidth and by per-op overhead. Each
# core trains one stack of modules single-threaded: with torch's own threads every op of every epoch waits on
# a barrier, which made training 2-4x slower as soon as another process used a core. One stack per core
# (smollm2-135m: 30 modules, 44 MB a stack) runs 5,000 epochs of fewer, larger ops than cache-sized stacks of
# 8 MiB did: 0.65-0.71x their time for its 60 probes (240 prompts x 1536 neurons) on 2 slow cores, 0.85x on
# qwen2.5-coder-0.5b, the same neurons selected (benchmarks/probe_stacks.py, BENCHMARKS.md). A stack is capped
# in size so that large models' copies stay small. On a GPU all modules of one width go at once.
CPU_STACK_MAX_BYTES = 256 * 2**20


def standardise(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron mean and scale over the training prompts (axis -2). Constant neurons get scale inf -> 0."""
    mean = train.mean(dim=-2)
    std = train.std(dim=-2, correction=0)
    # Neurons that always peak on the shared chat-template prefix are constant up to float noise; dividing
    # by that noise would turn it into a unit-variance feature.
    constant = std <= 1e-5 * mean.abs().clamp_min(1.0)
    return mean, torch.where(constant, torch.full_like(std, float("inf")), std)


def roc_auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC, or NaN when the prompts hold only one class."""
    from sklearn.metrics import roc_auc_score

    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels.numpy(), scores.numpy()))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, weight_decay: float):
    """Full-batch logistic regressions for a stack of modules: x (modules, prompts, n), y (prompts,).

    Returns weights (modules, n) and biases (modules,). The gradient of the mean binary cross-entropy is
    written out (X^T (sigmoid(Xw + b) - y) / P) because it is two matrix-vector products per epoch, with no
    autograd graph to build 5,000 times. Adam's weight_decay is L2 added to the gradient, as in NeuroStrike.
    """
    m, p, n = x.shape
    w = torch.zeros(m, 1, n, device=x.device, requires_grad=True)  # zero init: no seed-dependent noise
    b = torch.zeros(m, 1, 1, device=x.device, requires_grad=True)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    fused = x.device.type in ("cpu", "cuda")
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay, fused=fused)
    xt = x.transpose(1, 2)
    target = y.view(1, 1, p).to(x)
    for _ in range(epochs):
        with torch.no_grad():
            residual = (torch.sigmoid(torch.baddbmm(b, w, xt)) - target).div_(p)  # (m, 1, p)
            torch.bmm(residual, x, out=w.grad)
            torch.sum(residual, dim=2, keepdim=True, out=b.grad)
        opt.step()
    return w.detach().view(m, n), b.detach().view(m)


def train_probes(features: dict[str, torch.Tensor], labels: torch.Tensor, epochs: int, lr: float,
                 weight_decay: float, seed: int, heldout_mask: torch.Tensor | None = None,
                 device: str | torch.device = "cpu") -> dict[str, dict]:
    """One logistic-regression probe per target, trained as batched tensor programs.

    features: {name: (n_prompts, n_neurons)}; labels: (n_prompts,) 1 harmful / 0 benign; heldout_mask:
    (n_prompts,) bool, prompts kept out of training and used for the AUC. Targets of equal width are stacked
    into (modules, prompts, neurons) tensors: one per width on a GPU, one stack per core on CPU (capped at
    CPU_STACK_MAX_BYTES). Training is deterministic (zero init, full batch); `seed` only seeds torch for
    symmetry with the other stages.

    Returns {name: {"weight": (n,), "bias": float, "mean": (n,), "std": (n,), "auc": held-out AUC (NaN
    without held-out prompts of both classes), "train_acc": float}}; weights apply to standardised features.
    """
    torch.manual_seed(seed)
    labels = labels.float().cpu()
    heldout = torch.zeros(len(labels), dtype=torch.bool) if heldout_mask is None else heldout_mask.cpu()
    train = ~heldout
    if train.sum() == 0:
        raise NestuneError("no prompts are left to train the probes", "lower detect.heldout_fraction")
    device = torch.device(device)

    by_width: dict[int, list[str]] = {}
    for name, x in features.items():
        by_width.setdefault(x.shape[1], []).append(name)
    chunks = []
    for width, names in by_width.items():
        step = len(names)
        if device.type == "cpu":
            per_module = int(train.sum()) * width * 4
            step = max(1, min(math.ceil(len(names) / torch.get_num_threads()), CPU_STACK_MAX_BYTES // per_module))
        chunks += [names[i : i + step] for i in range(0, len(names), step)]

    def job(names: list[str]):
        x = torch.stack([features[nm].float().cpu() for nm in names])  # (modules, prompts, width)
        return names, _probe_chunk(x, labels, heldout, epochs, lr, weight_decay, device)

    done = _on_each_core([partial(job, c) for c in chunks]) if device.type == "cpu" else [job(c) for c in chunks]
    results = {nm: r for names, rs in done for nm, r in zip(names, rs)}
    return {nm: results[nm] for nm in features}  # the caller's order


def _probe_chunk(x: torch.Tensor, labels: torch.Tensor, heldout: torch.Tensor, epochs: int, lr: float,
                 weight_decay: float, device: torch.device) -> list[dict]:
    """Standardise, fit and score the probes of a stack of modules x (modules, prompts, width)."""
    train = ~heldout
    mean, std = standardise(x[:, train])
    z = ((x - mean[:, None]) / std[:, None]).to(device)
    w, b = _fit_logistic(z[:, train.to(device)].contiguous(), labels[train].to(device), epochs, lr,
                         weight_decay)
    logits = (torch.einsum("mpn,mn->mp", z, w) + b[:, None]).cpu()
    w, b = w.cpu(), b.cpu()
    out = []
    for i in range(len(x)):
        acc = ((logits[i, train] > 0).float() == labels[train]).float().mean()
        out.append({"weight": w[i], "bias": float(b[i]), "mean": mean[i], "std": std[i],
                    "auc": roc_auc(labels[heldout], logits[i, heldout]), "train_acc": float(acc)})
    return out


def _on_each_core(jobs: list) -> list:
    """Run independent jobs in a thread per core, each with single-threaded torch ops (see CPU_CHUNK_BYTES)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda job: job(), jobs))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# Selection


def sign_score(z: torch.Tensor, sign: str) -> torch.Tensor:
    """The score the threshold applies to: z (positive), -z (negative) or |z| (both)."""
    if sign == "positive":
        return z
    if sign == "negative":
        return -z
    if sign == "both":
        return z.abs()
    raise NestuneError(f"unknown detect.sign '{sign}'", f"use one of {', '.join(SIGNS)}")


def select_neurons(weight: torch.Tensor, z_threshold: float, sign: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) of neurons whose probe weight's z-score within the module passes the threshold."""
    std = weight.std(correction=0)
    z = (weight - weight.mean()) / std if std > 0 else torch.zeros_like(weight)
    indices = torch.nonzero(sign_score(z, sign) > z_threshold).flatten()
    return indices, z


# ---------------------------------------------------------------------------------------------------------
# The stage


def heldout_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A stratified, seeded held-out mask: `fraction` of each class, at least one prompt kept for training."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        if fraction > 0:
            k = min(max(k, 1), len(idx) - 1)
        mask[idx[:k]] = True
    return mask


def _as_records(items, kind: str) -> list[tuple[str, str, str]]:
    """(text, id, source) for data.Prompt objects or plain strings."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((item, f"{kind}-{i}", "given"))
        else:
            out.append((item.text, str(item.id), item.source))
    return out


def _check_sizes(harmful: list, benign: list, min_prompts: int) -> tuple[list, list]:
    both = {" ".join(r[0].casefold().split()) for r in harmful} & {" ".join(r[0].casefold().split()) for r in benign}
    if both:  # one prompt with two labels: the probes cannot learn it, and training would refuse a benign prompt
        raise NestuneError(f"{len(both)} prompt(s) are in both the harmful and the benign set, e.g. "
                           f"{next(iter(sorted(both)))[:60]!r}", "remove them from one of the two sets")
    for name, items in (("harmful", harmful), ("benign", benign)):
        if not items:
            raise NestuneError(f"the {name} prompt set for detection is empty",
                               f"check detect.{name} (a bundled set name or a prompt file)")
        if len(items) < min_prompts:
            raise NestuneError(
                f"only {len(items)} {name} prompts for detection; probes need at least {min_prompts} per class",
                f"use a larger detect.{name} set, raise detect.n_prompts, or lower detect.min_prompts",
            )
    n = min(len(harmful), len(benign))
    if abs(len(harmful) - len(benign)) > 0.1 * max(len(harmful), len(benign)):
        print(f"warning: {len(harmful)} harmful vs {len(benign)} benign prompts; using {n} of each so the "
              "probes see balanced classes", flush=True)
        return harmful[:n], benign[:n]
    return harmful, benign


def run_detect(cfg: Config, run: RunFolder, loaded: LoadedModel | None = None, harmful=None,
               benign=None) -> dict:
    """The detect stage: capture, probe, select, write RUN/detect. `harmful`/`benign` override the data sets."""
    d = cfg.detect
    if d.sign not in SIGNS:
        raise NestuneError(f"unknown detect.sign '{d.sign}'", f"use one of {', '.join(SIGNS)}")
    if d.pool not in POOLS:
        raise NestuneError(f"unknown detect.pool '{d.pool}'", f"use one of {', '.join(POOLS)}")
    if not 0 <= d.heldout_fraction < 1:
        raise NestuneError(f"detect.heldout_fraction must be in [0, 1), not {d.heldout_fraction}",
                           "--set detect.heldout_fraction=0.25")
    if harmful is None or benign is None:
        from . import data
    if harmful is None:
        harmful = data.pick(d.harmful, "detect", d.n_prompts, cfg.seed)
    if benign is None:
        benign = data.pick(d.benign, "detect", d.n_prompts, cfg.seed)
    harmful, benign = _check_sizes(_as_records(harmful, "harmful"), _as_records(benign, "benign"),
                                   d.min_prompts)
    records = harmful + benign
    labels = torch.tensor([1] * len(harmful) + [0] * len(benign))
    heldout = heldout_split(labels, d.heldout_fraction, cfg.seed)

    if loaded is None:
        from .models import load_model

        loaded = load_model(cfg.model, cfg.device, cfg.dtype, device_map=cfg.device_map or None,
                            max_memory=cfg.max_memory or None, trust_remote_code=cfg.trust_remote_code)
    model = loaded.model
    targets = ffn_targets(model)

    start = time.perf_counter()
    features = capture_pooled(model, loaded.tokenizer, [r[0] for r in records], targets, d.batch_size,
                              d.max_length, d.pool)
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    probe_device = input_device(model) if input_device(model).type == "cuda" else "cpu"
    probes = train_probes(features, labels, d.probe_epochs, d.probe_lr, d.probe_weight_decay, cfg.seed,
                          heldout, device=probe_device)
    probe_s = time.perf_counter() - start

    selected, zs = {}, {}
    for t in targets:
        selected[t.name], zs[t.name] = select_neurons(probes[t.name]["weight"], d.z_threshold, d.sign)
    max_z = {t.name: float(sign_score(zs[t.name], d.sign).max()) for t in targets}
    total = sum(len(s) for s in selected.values())
    if total == 0:
        best = max(max_z.values())
        suggestion = max(0.1, math.floor(best * 10) / 10 - 0.1)
        raise NestuneError(
            f"no neuron passes detect.z_threshold={d.z_threshold} (sign {d.sign}) in any module; "
            f"the largest z-score is {best:.2f}",
            f"lower the threshold, e.g. --set detect.z_threshold={suggestion:.1f}",
        )

    out = run.stage("detect")
    tensors = {}
    for t in targets:
        p = probes[t.name]
        tensors.update({f"{t.name}.weight": p["weight"], f"{t.name}.z": zs[t.name],
                        f"{t.name}.bias": torch.tensor([p["bias"]]), f"{t.name}.mean": p["mean"],
                        f"{t.name}.std": p["std"]})
    save_tensors(out / "probes.safetensors", tensors)
    acts = {t.name: features[t.name][:, selected[t.name]] for t in targets if len(selected[t.name])}
    save_tensors(out / "activations.safetensors", {**acts, "labels": labels})

    total_neurons = sum(t.n_neurons for t in targets)
    aucs = [probes[t.name]["auc"] for t in targets if not math.isnan(probes[t.name]["auc"])]
    summary = {  # AUCs are None (JSON null) where no held-out prompts of both classes exist
        "total_selected": total,
        "total_neurons": total_neurons,
        "share": total / total_neurons,
        "mean_auc": sum(aucs) / len(aucs) if aucs else None,
        "min_auc": min(aucs) if aucs else None,
        "n_targets": len(targets),
        "n_targets_selected": len(acts),
        "z_threshold": d.z_threshold,
        "sign": d.sign,
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "n_heldout": int(heldout.sum()),
        "capture_s": round(capture_s, 2),
        "probe_s": round(probe_s, 2),
    }
    per_target = {
        t.name: {**dataclasses.asdict(t), "selected": selected[t.name].tolist(),
                 "n_selected": len(selected[t.name]), "auc": _or_none(probes[t.name]["auc"]), "max_z": max_z[t.name],
                 "train_acc": probes[t.name]["train_acc"]}
        for t in targets
    }
    prompts = {"ids": [r[1] for r in records], "sources": [r[2] for r in records],
               "labels": labels.tolist(), "heldout": heldout.tolist()}
    write_json(out / "neurons.json", {**summary, "targets": per_target, "prompts": prompts})
    plot_per_layer(per_target, out / "neurons_per_layer.png")
    print_summary(summary, per_target)
    run.mark_done("detect", summary)
    return summary


def load_selection(run: RunFolder) -> tuple[list[FFNTarget], dict[str, list[int]]]:
    """All targets of the detected model (in layer order), and the selected rows of those with any."""
    info = read_json(run.require("detect", "run `nestune detect` first") / "neurons.json")
    fields = [f.name for f in dataclasses.fields(FFNTarget)]
    targets = [FFNTarget(**{k: entry[k] for k in fields}) for entry in info["targets"].values()]
    selected = {name: entry["selected"] for name, entry in info["targets"].items() if entry["selected"]}
    return targets, selected


# ---------------------------------------------------------------------------------------------------------
# Reporting


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _per_layer(per_target: dict) -> tuple[list[int], dict[str, dict[int, int]]]:
    layers = sorted({e["layer"] for e in per_target.values()})
    counts: dict[str, dict[int, int]] = {}
    for e in per_target.values():
        counts.setdefault(e["kind"], {})[e["layer"]] = e["n_selected"]
    return layers, counts


def plot_per_layer(per_target: dict, path) -> None:
    """Bar chart of safety neurons per layer, stacked by module kind (no pyplot: no global backend state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers, counts = _per_layer(per_target)
    fig = Figure(figsize=(max(5.0, 0.25 * len(layers) + 2), 3.2), layout="constrained")
    ax = fig.add_subplot()
    bottom = [0] * len(layers)
    for kind, by_layer in counts.items():
        heights = [by_layer.get(layer, 0) for layer in layers]
        ax.bar(layers, heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer")
    ax.set_ylabel("safety neurons")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Safety neurons per layer")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def print_summary(summary: dict, per_target: dict) -> None:
    layers, counts = _per_layer(per_target)
    kinds = list(counts)
    auc = {(e["layer"], e["kind"]): e["auc"] for e in per_target.values()}
    print("layer  " + "  ".join(f"{k:>5}" for k in kinds) + "   probe AUC (" + "/".join(kinds) + ")")
    for layer in layers:
        cells = "  ".join(f"{counts[k].get(layer, 0):>5}" for k in kinds)
        print(f"{layer:>5}  {cells}   " + "/".join(_fmt(auc[(layer, k)]) for k in kinds))
    print(f"detect: {summary['total_selected']:,} safety neurons of {summary['total_neurons']:,} FFN neurons "
          f"({100 * summary['share']:.2f}%) in {summary['n_targets_selected']} of {summary['n_targets']} modules; "
          f"mean held-out probe AUC {_fmt(summary['mean_auc'])} (min {_fmt(summary['min_auc'])}); "
          f"capture {summary['capture_s']:.1f} s, probes {summary['probe_s']:.1f} s", flush=True)
