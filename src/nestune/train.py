"""Training: the data, the objective and one loop, shared by NeST and the baselines (DESIGN.md 1.3).

Data (no jailbreak prompts, ever):
- harmful prompts from the train split -> a refusal: the model's own refusal where it already refuses,
  otherwise a sentence from a varied refusal bank;
- benign prompts from the train split -> the original model's own greedy answer (cross-entropy), or a KL
  term to the original model's next-token distribution over that answer; a share of them may be asked in a
  benign framing (`train.benign_framed`), and safe look-alikes may join them (`train.n_lookalike`).
The original answers are generated once, before training, and cached in RUN/train/targets.jsonl.

Loss only on response tokens. AdamW over the trainable parameters only. A checkpoint (trainable tensors,
optimizer state, position) is written at the end of each epoch in safetensors + JSON, and a rerun resumes
from it.

Data parallel: under `accelerate launch -m nestune train ...` (or torchrun) every process holds the whole
model and takes its share of each global batch; the gradients of the trainable tensors are averaged before
each step, so N processes train what one process would with the same train.batch_size. Only the main
process writes artifacts and shows progress (see `launched_accelerator` and `train_loop`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import SELECTION_METHODS, Config
from .errors import NestuneError
from .io import read_json, read_jsonl, save_tensors, write_json, write_text
from .models import LoadedModel, chat_prompts, input_device, position_ids
from .runfolder import RunFolder

DEFAULT_OPENING = "Sure, here is"
REFUSAL_BANK = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot provide that information. It could be used to cause serious harm.",
    "I won't help with this. If you have a different question, I'm happy to help.",
    "I cannot help with that, as it could put people at risk.",
    "Sorry, but I'm not able to help with this request.",
    "I'm unable to provide instructions for that. It would be harmful and possibly illegal.",
    "I can't help with creating or spreading anything meant to hurt people.",
    "I must decline this request because it could lead to harm.",
    "I'm sorry, I can't do that. Is there something else I can help you with?",
    "That's not something I can help with. Please consider a safe and legal alternative.",
    "I cannot fulfil this request. Helping with it could cause real harm to others.",
]

# Benign framings for train.benign_framed: a safe question asked in a persona or with a style instruction, so that
# refusal is learnt from what is asked rather than how (written for nestune; no jailbreak template among them).
BENIGN_FRAMINGS = [
    "In character as a friendly pirate, answer this: {q}",
    "Disregard formality and explain like I'm five: {q}",
    "Pretend you are my favourite teacher. {q}",
    "You are a medieval storyteller. Stay in character and tell me: {q}",
    "Answer without any disclaimers or caveats: {q}",
    "From now on you speak like a sports commentator. {q}",
    "Ignore your usual style and answer in one short paragraph: {q}",
    "Role-play as a wise old wizard advising a young apprentice. {q}",
]


# train.lr = 0 means the method's usual learning rate. For nest, neurons and random the lr is relative: each
# delta's Adam step is lr x the RMS of the weight rows it changes (NeSTAdapter.row_scales), because the same
# absolute lr that hardens smollm2-135m (row RMS ~0.19) wrecks qwen2.5-0.5b (row RMS ~0.02).
# Circuit breakers: the published 1e-4 is for 150 steps of 16 on 8B models in bf16; in the default budget (72
# steps of 8) it left qwen2.5-coder-0.5b unchanged, and 1e-3 rerouted it (ASR 58.8% -> 0%, benign KL 0.003;
# 1e-2 wrecked it: README, "Comparing methods").
RELATIVE_LR = 0.5
METHOD_LR = {"nest": RELATIVE_LR, "neurons": RELATIVE_LR, "random": RELATIVE_LR,
             "full": 2e-5, "lora": 2e-4, "circuit-breakers": 1e-3}


def with_method_lr(cfg: Config, method: str) -> Config:
    """A copy of cfg with the method's default lr filled in when the user left train.lr at 0."""
    if cfg.train.lr:
        return cfg
    cfg = copy.deepcopy(cfg)  # the caller's config (shared by a comparison) stays as it was
    cfg.train.lr = METHOD_LR[method]
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Training targets


def build_targets(loaded: LoadedModel, cfg: Config, run: RunFolder, harmful=None, benign=None) -> list[dict]:
    """Prompts and the responses to train towards, generated once and cached in RUN/train/targets.jsonl."""
    path = run.stage("train") / "targets.jsonl"
    if path.exists():
        return read_jsonl(path)
    from . import data
    from .evaluate.generate import HFGenerator
    from .evaluate.judges import RefusalJudge

    t = cfg.train
    if harmful is None:
        harmful = data.pick(t.harmful or cfg.detect.harmful, "train", t.n_harmful, cfg.seed)
    # Affirmative openings to recover from (see `prefill_rows`): the set's own target strings where it has them.
    openings = [getattr(p, "target", "") or DEFAULT_OPENING for p in harmful]
    harmful = [getattr(p, "text", p) for p in harmful]
    lookalike, n_framed = [], 0
    if benign is None:
        benign = [p.text for p in data.pick(t.benign or cfg.detect.benign, "train", t.n_benign, cfg.seed)]
        if t.n_lookalike:
            lookalike = [p.text for p in data.pick(cfg.eval.overrefusal, "train", t.n_lookalike, cfg.seed)]
        n_framed = round(t.benign_framed * len(benign))
        framing = random.Random(cfg.seed + 1)
        benign[len(benign) - n_framed:] = [framing.choice(BENIGN_FRAMINGS).format(q=q)
                                           for q in benign[len(benign) - n_framed:]]
    if not harmful:
        raise NestuneError("no harmful training prompts", "pass a non-empty harmful set (--harmful)")
    generator = HFGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size,
                            max_length=t.max_length)
    print(f"generating the original model's answers to {len(harmful)} harmful and {len(benign) + len(lookalike)} benign "
          f"training prompts ({t.answer_tokens} tokens each)", flush=True)
    responses = generator.generate(harmful + benign + lookalike, None, t.answer_tokens)
    judge = RefusalJudge()
    refused = judge.judge(harmful, responses[: len(harmful)])
    rng = random.Random(cfg.seed)
    rows = []
    n_prefilled = round(t.prefill_fraction * len(harmful))
    prefilled = set(rng.sample(range(len(harmful)), n_prefilled))
    for i, (prompt, response, own) in enumerate(zip(harmful, responses, refused)):
        target = response.strip() if own else rng.choice(REFUSAL_BANK)
        row = {"kind": "harmful", "prompt": prompt, "response": target, "own_refusal": bool(own),
               "original": response.strip()}  # circuit breakers train on the model's own compliant answers
        if i in prefilled:
            # The answer opens compliantly and turns to a refusal: the loss sees only the refusal, so the
            # model learns to stop even after an affirmative start (an assistant-prefill attack).
            row["prefix"] = openings[i].strip()
            row["response"] = "\n\n" + rng.choice(REFUSAL_BANK)
        rows.append(row)
    benign_responses = responses[len(harmful):]
    framed = range(len(benign) - n_framed, len(benign))
    # A refusal would teach the model to refuse a safe question for its framing: such prompts are left out.
    left_out = {i for i in framed if judge.refused(benign_responses[i])}
    if left_out:
        print(f"left out {len(left_out)} of {n_framed} framed benign prompts: the original model refused them",
              flush=True)
    for i, (prompt, response) in enumerate(zip(benign + lookalike, benign_responses)):
        if i in left_out:
            continue
        row = {"kind": "benign", "prompt": prompt, "response": response.strip()}
        if i in framed:
            row["framed"] = True
        if i >= len(benign):
            row["lookalike"] = True  # a safe prompt that looks unsafe, kept as the original model answered it
        rows.append(row)
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def row_counts(rows: list[dict]) -> dict:
    """What the training rows hold, for every method's summary.json."""
    return {"n_harmful": sum(r["kind"] == "harmful" for r in rows),
            "n_benign": sum(r["kind"] == "benign" for r in rows),
            "n_lookalike": sum(bool(r.get("lookalike")) for r in rows),
            "n_framed": sum(bool(r.get("framed")) for r in rows),
            "own_refusals": sum(bool(r.get("own_refusal")) for r in rows)}


# ---------------------------------------------------------------------------------------------------------
# Tokenising and batching


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss sees response tokens only
    benign: bool


def tokenize_examples(tokenizer, rows: list[dict], max_length: int) -> list[Example]:
    prompts = chat_prompts(tokenizer, [r["prompt"] for r in rows])
    examples = []
    eos = tokenizer.eos_token or ""
    for row, prompt in zip(rows, prompts):
        p_ids = tokenizer(prompt + row.get("prefix", ""), add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(row["response"] + eos, add_special_tokens=False)["input_ids"]
        p_ids = p_ids[-max(1, max_length - len(r_ids)):]  # keep the prompt's end (the generation prompt)
        ids = (p_ids + r_ids)[:max_length]
        labels = ([-100] * len(p_ids) + r_ids)[:max_length]
        examples.append(Example(ids, labels, row["kind"] == "benign"))
    return examples


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-pad a batch, so every response ends at the right edge and the LM head need only run on the last
    `logits_width(batch)` positions (`response_loss`); positions count real tokens only, as in generation."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        labels[i, width - n:] = torch.tensor(e.labels)
        mask[i, width - n:] = 1
    benign = torch.tensor([e.benign for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": position_ids(mask).to(device), "labels": labels.to(device), "benign": benign.to(device)}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def logits_width(batch: dict[str, torch.Tensor]) -> int:
    """Positions, counted from the right, whose logits predict a response token: the longest response + 1."""
    width = batch["labels"].shape[1]
    labelled = (batch["labels"] != -100).any(0).nonzero()
    return min(width, width - int(labelled[0]) + 1) if len(labelled) else 1


def accepts_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


# ---------------------------------------------------------------------------------------------------------
# Objective


def response_loss(model, batch, cfg: Config, reference=None) -> torch.Tensor:
    """Mean over examples of the per-example mean token loss on response tokens.

    Harmful examples: cross-entropy to the refusal. Benign examples: cross-entropy to the original answer,
    or (benign_loss = "kl") KL(original || adapted) of the next-token distributions on the answer tokens,
    where `reference()` is a context in which the model is the original one (adapter disabled).
    """
    # Logits only where they predict a response token: the LM head and the softmax over the vocabulary are a
    # large share of a small model's step, and about half the positions are prompt.
    keep = logits_width(batch)
    extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}

    def response_logits(inputs):
        return model(**inputs, **extra).logits[:, -keep:][:, :-1]

    logits = response_logits(model_inputs(batch))
    labels = batch["labels"][:, batch["labels"].shape[1] - keep + 1:]
    mask = (labels != -100).float()
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    per_token = ce
    benign = batch["benign"]
    if cfg.train.benign_loss == "kl" and benign.any():
        if reference is None:
            raise NestuneError("benign_loss 'kl' needs the original model", "use benign_loss = 'answer'")
        # The original model runs on the benign rows only, and the softmaxes over the vocabulary too: the
        # harmful rows' KL would be thrown away (on smollm2-135m the train stage took 1.6x the cross-entropy
        # loss's with the whole batch, 1.2-1.3x with the benign rows; BENCHMARKS.md).
        with torch.no_grad(), reference():
            ref = response_logits({k: v[benign] for k, v in model_inputs(batch).items()})
        kl = torch.zeros_like(ce)
        kl[benign] = F.kl_div(F.log_softmax(logits[benign].float(), -1), F.log_softmax(ref.float(), -1),
                              log_target=True, reduction="none").sum(-1)
        per_token = torch.where(benign[:, None], kl, ce)
    per_example = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    weights = torch.where(benign, cfg.train.benign_weight, 1.0)
    return (per_example * weights).sum() / weights.sum()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (no pickle: tensors in safetensors, the rest in JSON)


def save_checkpoint(folder: Path, params: dict[str, torch.Tensor], optimizer, position: dict) -> None:
    tensors = {f"param.{k}": v for k, v in params.items()}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    # The position also rides in the tensors file's metadata: that one atomic file is the checkpoint, so a kill
    # between the two writes cannot pair new tensors with the previous epoch's position.
    save_tensors(folder / "checkpoint.safetensors", tensors, metadata={"position": json.dumps(position)})
    write_json(folder / "checkpoint.json", position)  # written last: a checkpoint without it is ignored


def load_checkpoint(folder: Path, params: dict[str, torch.Tensor], optimizer) -> dict | None:
    if not (folder / "checkpoint.json").exists() or not (folder / "checkpoint.safetensors").exists():
        return None
    from safetensors import safe_open

    with safe_open(str(folder / "checkpoint.safetensors"), "pt") as f:  # one read: tensors and position
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(tensors[f"param.{k}"])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return json.loads(metadata["position"]) if "position" in metadata else read_json(folder / "checkpoint.json")


# ---------------------------------------------------------------------------------------------------------
# The loop


def launched_accelerator(cpu: bool = False):
    """An `accelerate.Accelerator` when this process is one of several (`accelerate launch`, torchrun), else None.

    `cpu`: the processes train on CPU (gloo); accelerate only joins CPU processes into a group when told so.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    # Imported before the process group exists: torch's ShardedGradScaler takes `dist.group.WORLD` as a default
    # argument, so importing FSDP (transformers does) once the group exists pins it. Its gloo threads then outlive
    # destroy_process_group, and one that frees the last collective while Python shuts down aborts the process.
    import torch.distributed.fsdp  # noqa: F401
    from accelerate import Accelerator

    # An accelerate FSDP config (`distributed_type: FSDP`, or `--use_fsdp`) asks for sharding. nestune shards
    # the model itself (baselines.shard_model), so accelerate is not told: its FSDP mode would build a plugin
    # nestune does not use, and it refuses CPU processes.
    if os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        os.environ[LAUNCHER_FSDP] = "1"
    accelerator = Accelerator(cpu=cpu)
    if accelerator.num_processes != world:
        raise NestuneError(f"{world} processes were launched, but accelerate joined {accelerator.num_processes}",
                           "launch with `accelerate launch --num_processes N -m nestune train ...`")
    return accelerator


LAUNCHER_FSDP = "NESTUNE_LAUNCHER_FSDP"  # set by launched_accelerator when accelerate's config asks for FSDP


def with_launcher_fsdp(cfg: Config, accelerator) -> Config:
    """Full fine-tuning shards (train.fsdp) when the accelerate config asks for FSDP; the other methods train
    few parameters and stay data parallel, which the main process says once."""
    if accelerator is None or cfg.train.fsdp or not os.environ.get(LAUNCHER_FSDP):
        return cfg
    if cfg.train.method == "full":
        cfg = copy.deepcopy(cfg)
        cfg.train.fsdp = True
        return cfg
    if is_main(accelerator):
        print(f"the accelerate config asks for FSDP, which nestune applies to full fine-tuning only: "
              f"'{cfg.train.method}' trains data parallel", flush=True)
    return cfg


def check_can_shard(cfg: Config, accelerator) -> None:
    if cfg.train.method != "full":
        raise NestuneError(f"train.fsdp shards full fine-tuning only, not '{cfg.train.method}'",
                           "drop --set train.fsdp=true: the other methods train few parameters, plain data "
                           "parallelism suits them")
    if accelerator is None or accelerator.num_processes < 2:
        raise NestuneError("train.fsdp shards the model over several processes, but this is one process",
                           "launch it with `accelerate launch --num_processes N -m nestune train ...`")
    if cfg.train.benign_loss == "kl":
        raise NestuneError("train.fsdp does not combine with train.benign_loss=kl (its reference weights would "
                           "need a second sharded copy)", "use train.benign_loss=answer with train.fsdp")


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def main_first(accelerator):
    """A block the main process runs first and the others after it (e.g. writing then reading a cache)."""
    return accelerator.main_process_first() if accelerator is not None else nullcontext()


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The multiplier of the lr at optimizer step `step` (0-based) of `total_steps`.

    Computed from the step alone (no scheduler state), so a resumed run continues the same schedule.
    """
    progress = min(step / total_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# With group_by_length, batches are cut from runs of this many batches sorted by length: on smollm2-135m's
# default data, random batches are padded to 1.34x the real tokens, runs of 4 to 1.10x (train 246 -> 198 s).
LENGTH_GROUP_BATCHES = 4


def epoch_batches(lengths: list[int], batch_size: int, group_by_length: bool, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of example indices, in a random order drawn from `rng`.

    Left padding costs compute in every layer, so with `group_by_length` each run of LENGTH_GROUP_BATCHES
    shuffled batches is re-cut by length (as transformers' group_by_length does over larger runs) and the
    batch order is shuffled again. That changes which examples share a batch: harmful prompts are shorter
    than benign ones, so batches become mostly one kind or the other.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    run = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), run):
        part = sorted(order[start:start + run], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# A forward's fixed cost in padded tokens' worth, for length_parts: on smollm2-135m (CPU, fp32) a training epoch
# took the same time with 50 and 100 and 0.86x the time of whole batches (BENCHMARKS.md).
PART_OVERHEAD_TOKENS = 64


def length_parts(lengths: list[int], overhead: int = PART_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split one batch (positions into `lengths`) into length-sorted parts that cost the least padded compute.

    A part of n examples padded to its longest costs n x longest + `overhead` tokens; the cheapest cut of the
    sorted batch is found exactly (dynamic programming over the cut points; a batch is a few examples).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for begin in range(end):
            cost = best[begin] + (end - begin) * lengths[order[end - 1]] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    parts, end = [], len(order)
    while end:
        parts.append(order[cut[end]:end])
        end = cut[end]
    return parts[::-1]


def batch_parts(examples: list[Example], idx: list[int], split: bool,
                benign_weight: float) -> list[tuple[list[int], float]]:
    """The forwards that run the batch `idx` (indices into `examples`): the whole batch, or its length_parts
    when `split`, each with its share of the batch's loss weights (response_loss weighs benign rows by
    `benign_weight`), so that the parts' weighted losses add up to the whole batch's."""
    weights = [benign_weight if examples[j].benign else 1.0 for j in idx]
    cuts = length_parts([len(examples[j].input_ids) for j in idx]) if split else [list(range(len(idx)))]
    return [([idx[k] for k in cut], sum(weights[k] for k in cut) / sum(weights)) for cut in cuts]


def train_loop(model, params: dict[str, torch.nn.Parameter], examples: list[Example], cfg: Config,
               folder: Path, loss_fn=None, pad_id: int = 0, accelerator=None,
               lr_scales: dict[str, float] | None = None, after_step=None, split_by_length: bool = True) -> dict:
    """AdamW on `params` over `examples` for cfg.train.epochs (or max_steps); resumable per epoch.

    `loss_fn(model, batch)` defaults to `response_loss`. `lr_scales` multiplies the lr of the named
    parameters (NeST's relative lr). `after_step()` runs after each optimizer step (train.protect's projection).
    Returns stats: steps, final loss, wall time, peak memory, examples seen.

    With an `accelerator` of N processes, each takes every N-th example of each micro-batch, weights its loss by
    its share of the batch, and the gradients are averaged over the processes before each step: the update is
    the one a single process computes from the whole batch (exactly so for per-example mean losses).
    With `split_by_length` (cfg.train.split_by_length, on CPU and unsharded only) each process's share of a
    batch runs as length_parts, each part's loss weighted by its share of the examples' loss weights
    (train.benign_weight): the same update as the padded whole, up to float rounding. Losses that are not a
    weighted mean over examples (circuit breakers') must not be split.
    """
    t = cfg.train
    if not examples:
        raise NestuneError("no training examples", "check the harmful and benign training sets")
    loss_fn = loss_fn or (lambda m, b: response_loss(m, b, cfg))
    if lr_scales:
        groups = [{"params": [p], "lr": t.lr * lr_scales[name]} for name, p in params.items()]
    else:
        groups = [{"params": list(params.values()), "lr": t.lr}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = math.ceil(len(examples) / (t.batch_size * t.grad_accum))
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    # Sharded parameters (FSDP, full fine-tuning) average their own gradients; they are not checkpointed
    # mid-training (each process holds only its shard), so a killed sharded run starts its training again.
    sharded = any(type(p).__name__ == "DTensor" for p in params.values())
    fresh = {"epoch": 0, "step": 0, "losses": []}
    position = fresh if sharded else load_checkpoint(folder, params, optimizer) or fresh
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    if world > 1 and not sharded:
        import torch.distributed as dist

        for p in params.values():  # every process starts from the main process's weights (e.g. LoRA's random A)
            dist.broadcast(p.data, src=0)
    if position["epoch"] and rank == 0:
        print(f"resuming training after epoch {position['epoch']} (step {position['step']})", flush=True)
    device = input_device(model)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if t.bf16 else nullcontext())
    # sharded parameters gather in every forward, so every process must run the same number of them
    split = split_by_length and t.split_by_length and device.type == "cpu" and not sharded
    start, step = time.perf_counter(), position["step"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=rank != 0)
    lengths = [len(e.input_ids) for e in examples]
    for epoch in range(position["epoch"], epochs):
        batches = epoch_batches(lengths, t.batch_size, t.group_by_length, random.Random(cfg.seed + epoch))
        for i in range(0, len(batches), t.grad_accum):
            if step >= total_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            factor = lr_factor(t.lr_schedule, step, total_steps)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            group, loss_sum = batches[i:i + t.grad_accum], 0.0
            for idx in group:
                mine = idx[rank::world]
                share = len(mine) * world / len(idx)  # 1 with one process; 0 for a process left without examples
                for part, part_share in batch_parts(examples, mine or idx[:1], split, t.benign_weight):
                    batch = collate([examples[j] for j in part], pad_id, device)
                    with autocast:
                        loss = loss_fn(model, batch) * (share * part_share / len(group))
                    if accelerator is not None:
                        accelerator.backward(loss)
                    else:
                        loss.backward()
                    loss_sum += loss.item()
            if world > 1:
                loss_sum = average_loss(loss_sum, world) if sharded else average_gradients(params, loss_sum, world)
            optimizer.step()
            if after_step is not None:
                after_step()
            step += 1
            position["losses"].append(round(loss_sum, 5))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=epoch + 1)
        position.update(epoch=epoch + 1, step=step)
        if is_main(accelerator) and not sharded:
            save_checkpoint(folder, {k: p.detach() for k, p in params.items()}, optimizer, position)
    bar.close()
    model.eval()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
    return {"steps": step, "epochs": epochs, "final_loss": position["losses"][-1] if position["losses"] else None,
            "losses": position["losses"], "wall_s": round(time.perf_counter() - start, 2), "peak_memory_bytes": peak,
            "examples_seen": min(step * t.batch_size * t.grad_accum, epochs * len(examples)), "processes": world,
            "lr_schedule": t.lr_schedule}


def average_gradients(params: dict[str, torch.nn.Parameter], loss: float, world: int) -> float:
    """Average every trainable tensor's gradient over the processes; returns the batch's loss, averaged too."""
    import torch.distributed as dist

    for p in params.values():
        if p.grad is None:  # every process must join every all-reduce, in the same order
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
    return average_loss(loss, world)


def average_loss(loss: float, world: int) -> float:
    """The batch's loss averaged over the processes (for the log and the summary)."""
    import torch.distributed as dist

    total = torch.tensor([loss], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")  # nccl reduces GPU tensors
    dist.all_reduce(total)
    return total.item() / world


def _reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux): without it, methods trained one after another in one process
    (`nestune compare`) would all report the largest peak seen so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak resident memory of this process on CPU since `_reset_peak_rss` (bytes); the same measure for
    every method. Falls back to the lifetime peak where /proc is not available."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------
# The stage


def adapter_specs(run: RunFolder, method: str, seed: int, model, side: str = "input") -> list:
    """Target rows and cluster ids for the adapter-shaped methods.

    nest: the clusters found by `nestune cluster`; neurons: the same rows, one update per neuron;
    random: as many rows per target as detection selected, drawn from the rows it did NOT select, with the
    same cluster sizes (shows whether detection matters). `side`: train.update_side.
    """
    from .cluster import load_clusters
    from .models import ffn_output, ffn_targets
    from .tuner import TargetUpdate

    targets = {t.name: t for t in ffn_targets(model)}
    clusters = load_clusters(run)
    rng = random.Random(seed)
    specs = []
    for name, entry in clusters.items():
        rows, ids = list(entry["rows"]), list(entry["clusters"])
        if method == "neurons":
            ids = list(range(len(rows)))
        elif method == "random":
            pool = sorted(set(range(targets[name].n_neurons)) - set(rows))
            rows = sorted(rng.sample(pool, len(rows)))
        elif method != "nest":
            raise ValueError(method)
        output = ffn_output(model, targets[name]) if side == "output" else None
        specs.append(TargetUpdate.from_target(targets[name], rows, ids, output))
    return specs


def run_train(cfg: Config, run: RunFolder, loaded: LoadedModel | None = None) -> dict:
    """Train the method's update on the run's selection and save it under RUN/train.

    Under `accelerate launch` every process loads the model onto its own device and trains on its share of
    each batch; the main process generates the training targets first and alone writes the results.
    """
    from .models import resolve_device

    accelerator = launched_accelerator(cpu=resolve_device(cfg.device) == "cpu")
    summary = _run_train(cfg, run, loaded, accelerator)
    if accelerator is not None:  # (a process that fails instead makes the launcher stop the others)
        accelerator.wait_for_everyone()  # no process leaves the group while the main one still writes
        accelerator.end_training()  # destroys the group, so its threads stop before Python shuts down
    return summary


def load_for_training(cfg: Config, run: RunFolder, loaded: LoadedModel | None, accelerator):
    """The model (on this process's device) and the training rows (generated once, by the main process)."""
    from .models import load_model

    device = cfg.device
    if accelerator is not None:
        if cfg.device_map:
            raise NestuneError("device_map splits one model over several devices, while `accelerate launch` "
                               "trains one copy of the model per process",
                               "drop --device-map for a data-parallel run, or train in one process")
        device = str(accelerator.device)
    loaded = loaded or load_model(cfg.model, device, cfg.dtype, device_map=cfg.device_map or None,
                                  max_memory=cfg.max_memory or None, trust_remote_code=cfg.trust_remote_code)
    with main_first(accelerator):
        rows = build_targets(loaded, cfg, run)
    return loaded, rows


def _run_train(cfg: Config, run: RunFolder, loaded: LoadedModel | None, accelerator) -> dict:
    method = cfg.train.method
    cfg = with_launcher_fsdp(cfg, accelerator)
    if cfg.train.fsdp:
        check_can_shard(cfg, accelerator)
    if method not in SELECTION_METHODS:
        from .baselines import run_baseline_train

        return run_baseline_train(cfg, run, loaded, accelerator=accelerator)
    from .tuner import NeSTAdapter, base_identity

    cfg = with_method_lr(cfg, method)
    run.require("cluster", "run `nestune cluster --run RUN` first (or `nestune run`)")
    loaded, rows = load_for_training(cfg, run, loaded, accelerator)
    model = loaded.model
    folder = run.stage("train")
    examples = tokenize_examples(loaded.tokenizer, rows, cfg.train.max_length)
    base = base_identity(model, cfg.model)

    for p in model.parameters():
        p.requires_grad_(False)
    adapter = NeSTAdapter(adapter_specs(run, method, cfg.seed, model, cfg.train.update_side))
    after_step, protected = None, {}
    if cfg.train.protect:
        from .protect import project, protection_bases

        bases, protected = protection_bases(cfg, loaded, adapter, rows)  # from the base model, before training
        after_step = partial(project, adapter, bases)
    adapter.attach(model)
    params = {name: p for name, p in adapter.named_parameters()}
    scales = adapter.row_scales(model)
    if is_main(accelerator):
        print(f"training {method}: {adapter.num_trainable():,} trainable parameters "
              f"({sum(len(s.rows) for s in adapter.specs):,} neurons in {sum(s.k for s in adapter.specs)} "
              "clusters)" + (f" on {accelerator.num_processes} processes" if accelerator else ""), flush=True)
    stats = train_loop(model, params, examples,
                       cfg, folder,
                       loss_fn=lambda m, b: response_loss(m, b, cfg, reference=adapter.disabled),
                       pad_id=loaded.tokenizer.pad_token_id, accelerator=accelerator, lr_scales=scales,
                       after_step=after_step)
    adapter.detach()
    if not is_main(accelerator):
        return {"method": method, **stats}  # the main process writes the results
    adapter.save(folder / "adapter", base, extra={"method": method})
    effective = sorted(cfg.train.lr * v for v in scales.values())
    summary = {"method": method, "trainable_params": adapter.num_trainable(), "lr": cfg.train.lr,
               "update_side": cfg.train.update_side,
               "lr_relative_to": "RMS of the weight rows (output side: columns) each delta changes",
               "effective_lr": {"min": effective[0], "median": effective[len(effective) // 2], "max": effective[-1]},
               "n_neurons": sum(len(s.rows) for s in adapter.specs),
               "n_clusters": sum(s.k for s in adapter.specs), **protected,
               **row_counts(rows), **stats}
    write_json(folder / "summary.json", summary)
    run.mark_done("train", {"method": method})
    print(f"trained {stats['steps']} steps in {stats['wall_s']:.0f}s, final loss {stats['final_loss']}", flush=True)
    return summary
