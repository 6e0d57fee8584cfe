"""Keep the cluster updates out of the directions safe prompts use (our addition; docs/method.md, docs/experiments.md).

An input-side update adds `delta . x` to its neurons' pre-activations on every token x that enters the FFN, so
wherever safe prompts' FFN inputs overlap the harmful ones', the update moves their answers too: on
qwen2.5-coder-0.5b the default update makes the model refuse safe look-alikes it answered before. With
`train.protect=EPS` every update vector is kept, after each optimizer step, in the directions of its FFN's input
that carry at most EPS of the energy of the protected prompts' tokens: training's benign prompts and the safe
look-alikes of the over-refusal set's detect and train parts, which evaluation never reads. This is the null-space
idea of AlphaEdit (arXiv 2410.02355) applied to NeST's shared vectors: on those prompts the update is nearly silent.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import Config
from .errors import NestuneError
from .models import LoadedModel, encode_chat, get_module, input_device, position_ids
from .train import accepts_logits_to_keep
from .tuner import NeSTAdapter


def protected_prompts(cfg: Config, rows: list[dict]) -> list[str]:
    """Training's benign prompts and the look-alikes of the over-refusal set's detect and train parts."""
    from . import data

    benign = [r["prompt"] for r in rows if r["kind"] == "benign"]
    return benign + data.lookalikes_outside_evaluation(cfg)


def input_moments(model, tokenizer, texts: list[str], paths: list[str], batch_size: int,
                  max_length: int) -> tuple[dict[str, torch.Tensor], int]:
    """{FFN input path: sum of x x^T over the prompts' tokens} (fp32, on the input's device), and the token count.

    The modules of one MLP (gate and up projections) read the same input, so each MLP is read once."""
    by_mlp = {}
    for path in paths:
        by_mlp.setdefault(path.rsplit(".", 1)[0], path)
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def record(path):
        def hook(module, args):
            x = args[0][mask[0].to(args[0].device)].float()  # the prompts' tokens, padding left out
            sums[path] = sums[path] + x.T @ x if path in sums else x.T @ x
        return hook

    hooks = [get_module(model, path).register_forward_pre_hook(record(path)) for path in by_mlp.values()]
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # only the FFN inputs are wanted
    tokens = 0
    try:
        with torch.no_grad(), tqdm(total=len(texts), desc="protected inputs", unit="prompt") as bar:
            for start in range(0, len(texts), batch_size):
                batch = encode_chat(tokenizer, texts[start:start + batch_size], max_length, input_device(model))
                mask[:] = [batch["attention_mask"].bool()]
                model(**batch, position_ids=position_ids(batch["attention_mask"]), **keep)
                tokens += int(mask[0].sum())
                bar.update(len(texts[start:start + batch_size]))
    finally:
        for h in hooks:
            h.remove()
    return {path: sums[by_mlp[path.rsplit(".", 1)[0]]] for path in paths}, tokens


def free_directions(moment: torch.Tensor, eps: float) -> torch.Tensor:
    """An orthonormal basis (d x f) of the directions left when the fewest eigen-directions of `moment` that
    hold at least 1 - eps of its energy are taken out."""
    values, vectors = torch.linalg.eigh(moment.double().cpu())
    values, vectors = values.flip(0), vectors.flip(1)  # largest first
    held = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
    protected = int((held < 1 - eps).sum()) + (eps < 1)  # eps 1 protects nothing
    return vectors[:, protected:].float().contiguous()


def protection_bases(cfg: Config, loaded: LoadedModel, adapter: NeSTAdapter, rows: list[dict]) -> tuple[dict, dict]:
    """{target name: basis of the directions its update may use}, from the base model (call before training),
    and what was protected, for train/summary.json."""
    texts = protected_prompts(cfg, rows)
    if not texts:
        raise NestuneError("train.protect has no prompts to protect", "train with benign prompts (train.n_benign)")
    print(f"train.protect={cfg.train.protect}: reading the FFN inputs of {len(texts)} benign and safe look-alike "
          "prompts", flush=True)
    moments, tokens = input_moments(loaded.model, loaded.tokenizer, texts, [s.module_path for s in adapter.specs],
                                    cfg.train.batch_size, cfg.train.max_length)
    cache: dict[int, torch.Tensor] = {}  # the gate and up projections of one MLP share their input's moment
    bases = {}
    for spec in adapter.specs:
        moment = moments[spec.module_path]
        if id(moment) not in cache:
            cache[id(moment)] = free_directions(moment, cfg.train.protect)
        bases[spec.name] = cache[id(moment)]
    free = sorted(b.shape[1] for b in bases.values())
    if not free[-1]:
        raise NestuneError(f"train.protect={cfg.train.protect} leaves no direction for the updates",
                           "use a larger train.protect (0.01 leaves the directions that hold 1% of the energy)")
    info = {"protect": cfg.train.protect, "protected_prompts": len(texts), "protected_tokens": tokens,
            "free_directions": {"min": free[0], "median": free[len(free) // 2], "max": free[-1],
                                "of": adapter.specs[0].d_model}}
    return bases, info


def project(adapter: NeSTAdapter, bases: dict[str, torch.Tensor]) -> None:
    """delta <- delta B B^T for every update: only its part in the free directions is kept."""
    with torch.no_grad():
        for spec in adapter.specs:
            delta = adapter.update_for(spec.name).delta
            basis = bases[spec.name].to(delta.device)
            delta.copy_((delta.float() @ basis @ basis.T).to(delta.dtype))
