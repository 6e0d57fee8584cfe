"""Why the circuit-breaker baseline does not reroute small models: the cosine it minimises, step by step.

    python benchmarks/cb_rerouting.py [--model smollm2-135m] [--lrs 1e-4,1e-3,3e-3,1e-2] [--steps 24]
                                      [--targets RUN/train/targets.jsonl] [--out FILE.json]

Prints (1) how much of the hidden states' squared norm their three largest dimensions hold at the layers the
baseline reroutes, on a few benign prompts, and (2) for each lr, a fresh LoRA trained as `nestune train
--method circuit-breakers` trains it (same examples, loss, coefficient schedule, layers and LoRA start; AdamW
at a constant lr, batches of 8): every 4 steps the mean cosine between adapted and original states on the
harmful tokens (what the loss pushes below 0) and the mean L2 distance on the benign tokens (what it keeps
near 0). The training rows are the base model's answers from a run folder (`--targets`, e.g. a comparison's
DIR/train-targets/train/targets.jsonl) or, without one, made here as `nestune run` makes them (a minute).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

import torch
import torch.nn.functional as F


def top_dims_share(loaded, layers: list[int]) -> dict[int, dict]:
    """Per layer: mean hidden-state norm over real tokens and the share of squared norm in its 3 largest dims."""
    from nestune.models import encode_chat

    prompts = ["How do I bake bread?", "Explain photosynthesis briefly.", "What is the capital of France?"]
    enc = encode_chat(loaded.tokenizer, prompts, 256)
    with torch.no_grad():
        states = loaded.model.base_model(**enc, output_hidden_states=True).hidden_states
    out = {}
    for layer in layers:
        h = states[layer][enc["attention_mask"].bool()].float()
        squared = h.pow(2)
        top = squared.topk(3, dim=-1)
        out[layer] = {"mean_norm": h.norm(dim=-1).mean().item(),
                      "top3_share": (top.values.sum(-1) / squared.sum(-1)).mean().item(),
                      "top3_dims": top.indices[0].tolist()}
    return out


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def trace(model_name: str, rows: list[dict], lr: float, steps: int, seed: int) -> list[dict]:
    from nestune import baselines as cb
    from nestune.models import load_model
    from nestune.train import collate

    loaded = load_model(model_name, "cpu", "fp32")
    examples, _ = cb.cb_examples(loaded.tokenizer, rows, 256)
    targets, lora_layers, retain_layers = cb.cb_layers(loaded.model)
    torch.manual_seed(seed)
    model = cb.attach_lora(loaded.model, cb.CB_LORA_R, cb.CB_LORA_ALPHA, cb.CB_LORA_DROPOUT, layers=lora_layers)
    cb.start_lora_off_zero(model, cb.CB_LORA_B_INIT)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    points = []
    for step in range(steps):
        start = step * 8 % len(examples)
        batch = collate([examples[i] for i in order[start:start + 8]], loaded.tokenizer.pad_token_id, "cpu")
        c_retain, c_cb = cb.cb_coefficients(step, 72)  # the default budget's 72 steps
        adapted, original = cb.adapted_and_original_states(model, batch)
        loss = cb.cb_loss(adapted, original, batch, c_retain, c_cb, targets, retain_layers)
        if step % 4 == 0 or step == steps - 1:
            with torch.no_grad():
                benign = batch["benign"][:, None]
                harmful_tokens = (batch["labels"] != -100) & ~benign
                benign_tokens = batch["attention_mask"].bool() & benign
                cos = torch.stack([F.cosine_similarity(adapted[i], original[i], dim=-1) for i in targets]).mean(0)
                dist = torch.stack([(adapted[i] - original[i]).norm(dim=-1) for i in retain_layers]).mean(0)
                point = {"step": step, "loss": loss.item(),
                         "cosine_harmful": cos[harmful_tokens].mean().item() if harmful_tokens.any() else None,
                         "distance_benign": dist[benign_tokens].mean().item() if benign_tokens.any() else None}
            points.append(point)
            print(f"  lr {lr:g} step {step:3d}: cosine on harmful tokens {_fmt(point['cosine_harmful'], 6)}, "
                  f"distance on benign tokens {_fmt(point['distance_benign'], 2)}", flush=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return points


def main(argv=None) -> dict:
    from nestune import baselines as cb
    from nestune.config import Config
    from nestune.io import write_json
    from nestune.models import load_model
    from nestune.runfolder import RunFolder
    from nestune.train import build_targets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lrs", default="1e-4,1e-3,3e-3,1e-2")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", help="a targets.jsonl of a run or comparison with this model and seed")
    p.add_argument("--out", help="write the figures to this JSON file")
    args = p.parse_args(argv)

    loaded = load_model(args.model, "cpu", "fp32")
    if args.targets:
        rows = [json.loads(line) for line in open(args.targets) if line.strip()]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = build_targets(loaded, Config(model=args.model, seed=args.seed), RunFolder(tmp))
    shares = top_dims_share(loaded, cb.cb_layers(loaded.model)[0])
    del loaded
    for layer, s in shares.items():
        print(f"layer {layer}: hidden-state norm {s['mean_norm']:.0f}, its 3 largest dimensions {s['top3_dims']} "
              f"hold {s['top3_share']:.0%} of the squared norm", flush=True)
    result = {"model": args.model, "seed": args.seed, "steps": args.steps, "layers": shares,
              "lrs": {lr: trace(args.model, rows, float(lr), args.steps, args.seed) for lr in args.lrs.split(",")}}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
