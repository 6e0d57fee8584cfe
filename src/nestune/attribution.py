"""Which trained clusters make the model refuse safe prompts (our addition; docs/method.md, docs/experiments.md).

Each cluster's share of the refusal is measured with integrated gradients over the size of the trained update:
as alpha goes from 0 (the base model) to 1 (the trained update), log p(refusal opening | prompt) changes, and the
change splits over the clusters as the integral of (gradient . delta). It is measured on two sets of prompts
that evaluation never sees: harmful training prompts (the refusals we want) and safe look-alikes (the train and
detect parts of eval.overrefusal: the refusals we do not want). On qwen2.5-coder-0.5b a handful of small
clusters carry most of the look-alikes' change and little of the harmful prompts'; `fold.drop_clusters=N` folds
the update without the N clusters whose look-alike share most exceeds their harmful share.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import NestuneError
from .io import read_json, read_jsonl, write_json
from .models import LoadedModel, encode_chat, input_device, position_ids
from .runfolder import RunFolder
from .tuner import NeSTAdapter

STEPS = 4  # alpha at the midpoints of 4 equal steps: on qwen the attributions sum to within 10% of the change
OPENING_TOKENS = 3  # "I'm sorry" on qwen2.5: enough to tell a refusal from an answer that starts with "I"


def refusal_opening(targets: list[dict]) -> str:
    """The opening of the refusal training aimed at most often (the harmful rows' most common target)."""
    refusals = Counter(r["response"].strip() for r in targets if r["kind"] == "harmful" and not r.get("prefix"))
    if not refusals:
        raise NestuneError("the training targets hold no refusal to attribute",
                           "rerun `nestune train` so that RUN/train/targets.jsonl is rebuilt")
    return refusals.most_common(1)[0][0]


def refusal_logprob(model, tokenizer, texts: list[str], opening: list[int], max_length: int) -> torch.Tensor:
    """log p(opening | chat prompt) for each text, teacher-forced (left-padded batch)."""
    device = input_device(model)
    batch = encode_chat(tokenizer, texts, max_length, device)
    n = len(opening)
    ids = torch.cat([batch["input_ids"], torch.tensor([opening] * len(texts), device=device)], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(texts), n, dtype=torch.long, device=device)], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                   logits_to_keep=n + 1).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, -n:, None])[..., 0].sum(1)


def cluster_attribution(model, tokenizer, adapter: NeSTAdapter, texts: list[str], opening: list[int],
                        batch_size: int = 8, max_length: int = 256, desc: str = "attribution") -> dict:
    """{target: [each cluster's share of the mean change in log p(opening)]}, the adapter attached."""
    updates = {spec.name: adapter.update_for(spec.name) for spec in adapter.specs}
    for update in updates.values():
        update.delta.requires_grad_(True)
    trained = {name: update.delta.detach().clone() for name, update in updates.items()}
    shares = {name: torch.zeros_like(delta[:, 0]) for name, delta in trained.items()}  # on the deltas' device
    alphas = [(i + 0.5) / STEPS for i in range(STEPS)]
    with tqdm(total=len(alphas) * len(texts), desc=desc, unit="prompt") as bar:
        try:
            for alpha in alphas:
                for name, update in updates.items():
                    update.delta.data = trained[name] * alpha
                for start in range(0, len(texts), batch_size):
                    chunk = texts[start:start + batch_size]
                    refusal_logprob(model, tokenizer, chunk, opening, max_length).sum().backward()
                    for name, update in updates.items():
                        shares[name] += (update.delta.grad * trained[name]).sum(1) / STEPS
                        update.delta.grad = None
                    bar.update(len(chunk))
        finally:
            for name, update in updates.items():
                update.delta.data = trained[name]
    return {name: (s / len(texts)).tolist() for name, s in shares.items()}


def run_attribution(cfg: Config, run: RunFolder, loaded: LoadedModel, adapter: NeSTAdapter) -> dict:
    """RUN/train/attribution.json: every cluster's share of the refusal change on harmful and on safe prompts,
    computed once per trained adapter (its file's hash is kept with it). `adapter` is RUN's, loaded and detached;
    it is left as it was."""
    from . import data

    adapter_dir = run.stage("train") / "adapter"
    weights_hash = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    path = run.stage("train") / "attribution.json"
    if path.exists() and read_json(path).get("adapter_hash") == weights_hash:
        return read_json(path)
    targets = read_jsonl(run.stage("train") / "targets.jsonl")
    opening = loaded.tokenizer(refusal_opening(targets), add_special_tokens=False)["input_ids"][:OPENING_TOKENS]
    harmful = [r["prompt"] for r in targets if r["kind"] == "harmful"]  # the prompts training refused
    lookalike = data.lookalikes_outside_evaluation(cfg)
    print(f"attributing the refusal '{loaded.tokenizer.decode(opening)}' to the clusters on {len(harmful)} "
          f"harmful and {len(lookalike)} safe look-alike prompts", flush=True)
    model = loaded.model
    model.requires_grad_(False)  # gradients to the deltas only
    adapter.attach(model)
    try:
        by_set = {name: cluster_attribution(model, loaded.tokenizer, adapter, texts, opening, cfg.train.batch_size,
                                            cfg.train.max_length, desc=f"attribution ({name})")
                  for name, texts in (("harmful", harmful), ("lookalike", lookalike))}
    finally:
        adapter.detach()
    clusters = []
    for spec in adapter.specs:
        for c in range(spec.k):
            clusters.append({"target": spec.name, "cluster": c, "neurons": spec.clusters.count(c),
                             "harmful": by_set["harmful"][spec.name][c],
                             "lookalike": by_set["lookalike"][spec.name][c]})
    result = {"adapter_hash": weights_hash, "opening": loaded.tokenizer.decode(opening), "steps": STEPS,
              "n_harmful": len(harmful), "n_lookalike": len(lookalike), "clusters": clusters}
    write_json(path, result)
    return result


def clusters_to_drop(attribution: dict, n: int) -> list[dict]:
    """The n clusters whose share of the look-alikes' refusal most exceeds their share of the harmful prompts'."""
    return sorted(attribution["clusters"], key=lambda c: c["harmful"] - c["lookalike"])[:n]


def drop_clusters(adapter: NeSTAdapter, dropped: list[dict]) -> None:
    """Zero the dropped clusters' update vectors: their neurons keep the base model's weights."""
    with torch.no_grad():
        for c in dropped:
            adapter.update_for(c["target"]).delta[c["cluster"]] = 0


def describe_drop(attribution: dict, dropped: list[dict]) -> str:
    total = {s: sum(c[s] for c in attribution["clusters"]) for s in ("harmful", "lookalike")}
    share = {s: sum(c[s] for c in dropped) / total[s] if total[s] else 0.0 for s in total}
    return (f"dropped {len(dropped)} of {len(attribution['clusters'])} clusters "
            f"({sum(c['neurons'] for c in dropped)} neurons): they carried {share['harmful']:.0%} of the refusal's "
            f"rise on harmful prompts and {share['lookalike']:.0%} of its rise on safe look-alikes"
            + (" (the other clusters together lower it)" if share["lookalike"] > 1 else ""))

