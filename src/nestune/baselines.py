"""Baselines, trained through the same data, objective and loop as NeST (DESIGN.md 1.5 and 3).

- full: full fine-tuning, every parameter trainable.
- lora: peft LoRA on every linear layer of the decoder (lm_head excluded), merged for evaluation.
- circuit-breakers: representation rerouting (Zou et al. 2024) with a LoRA on the lower layers.

All three read the cached targets in RUN/train/targets.jsonl, run `train.train_loop` over the same examples
for the same steps as NeST, write RUN/train/summary.json with the same keys as NeST's, and leave the trained
model as an ordinary checkpoint in RUN/train/merged, which `nestune fold` copies to RUN/fold/model. LoRA and
circuit breakers also keep their peft adapter in RUN/train/adapter-lora.

Learning rate: train.lr = 0 (the default) means each method's usual default (train.METHOD_LR: NeST's relative
lr would wreck a fully fine-tuned model); an lr the user sets is used as given. The lr used is recorded in
summary.json.

The trained model is changed in place (merged or fine-tuned weights): callers reload the base model
before using it again.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .errors import NestuneError
from .io import read_json, write_json
from .models import ARCHITECTURES, LoadedModel, chat_prompts, ffn_targets, get_module, model_type
from .runfolder import RunFolder
from .train import (
    Example,
    is_main,
    load_for_training,
    model_inputs,
    response_loss,
    row_counts,
    tokenize_examples,
    train_loop,
    with_method_lr,
)

BASELINES = ("full", "lora", "circuit-breakers")

# Circuit-breaker recipe (Zou et al. 2024, Llama-3-8B defaults; DESIGN.md 3).
CB_ALPHA = 10.0
CB_LORA_R, CB_LORA_ALPHA, CB_LORA_DROPOUT = 16, 16, 0.05
CB_REFERENCE_LAYERS, CB_REFERENCE_DEPTH = (10, 20), 32
# LoRA starts with B = 0, so the adapted states equal the original ones, where the cosine is at its maximum and
# its gradient is zero (on a tiny model 2e-7 against 7e-3 from this start: tests/test_baselines.py). In bf16
# rounding noise gets training off that point; in fp32 Adam only amplifies noise. B starts at this size instead,
# relative to each wrapped weight's RMS (ours; the reference implementation trains in bf16 on GPUs).
CB_LORA_B_INIT = 1e-3


def run_baseline_train(cfg: Config, run: RunFolder, loaded: LoadedModel | None = None, accelerator=None) -> dict:
    """Train the baseline named by cfg.train.method and save it under RUN/train.

    With an `accelerator` of several processes (train.launched_accelerator) the training is data parallel and
    only the main process writes the results.
    """
    method = cfg.train.method
    if method not in BASELINES:
        raise NestuneError(f"unknown training method '{method}'",
                           "use one of nest, neurons, random, full, lora, circuit-breakers")
    loaded, rows = load_for_training(cfg, run, loaded, accelerator)
    folder = run.stage("train")
    cfg = with_method_lr(cfg, method)
    trainers = {"full": train_full, "lora": train_lora, "circuit-breakers": train_circuit_breakers}
    info, stats = trainers[method](loaded, cfg, rows, run, accelerator)
    if not is_main(accelerator):
        return {"method": method, **info, **stats}  # the main process writes the results
    summary = {"method": method, **info,
               **row_counts(rows), "lr": cfg.train.lr, **stats}
    write_json(folder / "summary.json", summary)
    run.mark_done("train", {"method": method})
    print(f"trained {method}: {summary['trainable_params']:,} trainable parameters, {stats['steps']} steps in "
          f"{stats['wall_s']:.0f}s, final loss {stats['final_loss']}", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------------------
# Full fine-tuning


def train_full(loaded: LoadedModel, cfg: Config, rows: list[dict], run: RunFolder,
               accelerator=None) -> tuple[dict, dict]:
    model, folder = loaded.model, run.stage("train")
    examples = tokenize_examples(loaded.tokenizer, rows, cfg.train.max_length)
    trainable = sum(p.numel() for p in dict(model.named_parameters()).values())
    sharded = cfg.train.fsdp
    if sharded:  # (train.check_can_shard has vetted the setting)
        options = fsdp_options()
        if is_main(accelerator):
            print(describe_fsdp_options(options), flush=True)
        shard_model(model, options)
    params = dict(model.named_parameters())  # tied weights appear once, as the optimizer sees them
    for p in params.values():
        p.requires_grad_(True)
    reference = None
    if cfg.train.benign_loss == "kl":
        # No adapter to switch off here: the KL term needs one saved copy of the original weights.
        originals = {name: p.detach().clone() for name, p in params.items()}

        def reference():
            return original_weights(params, originals)
    if is_main(accelerator):
        where = (f", sharded over {accelerator.num_processes} processes (FSDP)" if sharded else "")
        print(f"training full: {trainable:,} trainable parameters (all of them){where}", flush=True)
    stats = train_loop(model, params, examples, cfg, folder,
                       loss_fn=lambda m, b: response_loss(m, b, cfg, reference=reference),
                       pad_id=loaded.tokenizer.pad_token_id, accelerator=accelerator)
    for p in params.values():
        p.requires_grad_(False)
    full_state = None
    if sharded:  # every process takes part in gathering the weights; the main one saves them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        stats["params_per_process"] = sum(p.to_local().numel() for p in params.values())
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main(accelerator):
        return {"trainable_params": trainable}, stats
    save_merged(loaded, cfg, folder, "full", trainable, state_dict=full_state)
    # The resume checkpoint holds the whole model plus two optimizer moments; the merged model replaces it.
    for name in ("checkpoint.json", "checkpoint.safetensors"):
        (folder / name).unlink(missing_ok=True)
    return {"trainable_params": trainable}, stats


# `accelerate launch` passes an FSDP config's fsdp_* keys to the processes as FSDP_* environment variables.
# nestune's own sharding honours reshard-after-forward (or the version-1 sharding strategy), parameter offload
# and activation checkpointing; these others, when set to anything but off, are named as not applied.
FSDP_NOT_APPLIED = ("FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_BACKWARD_PREFETCH",
                    "FSDP_FORWARD_PREFETCH", "FSDP_STATE_DICT_TYPE", "FSDP_IGNORED_MODULES",
                    "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD")


def fsdp_options(environ=None) -> dict:
    """{reshard_after_forward, offload_params, activation_checkpointing, not_applied} from the launcher's FSDP_*.

    reshard_after_forward: FSDP2's name; a version-1 config says it as sharding_strategy (FULL_SHARD: yes,
    SHARD_GRAD_OP: no). Wrapping is always one unit per decoder layer (what TRANSFORMER_BASED_WRAP gives), and
    the trained weights are always gathered whole for saving.
    """
    env = os.environ if environ is None else environ

    def flag(name: str, default: bool) -> bool:
        return env.get(name, str(default)).strip().lower() in ("1", "true", "yes")

    strategy = env.get("FSDP_SHARDING_STRATEGY", "").strip().upper()
    if strategy in ("NO_SHARD", "3", "HYBRID_SHARD", "4", "HYBRID_SHARD_ZERO2", "5"):
        raise NestuneError(f"the accelerate config asks for FSDP sharding strategy {strategy}, which nestune does "
                           "not implement", "use FULL_SHARD or SHARD_GRAD_OP (fsdp_reshard_after_forward with "
                           "fsdp_version 2), or plain data parallelism (no FSDP)")
    reshard = flag("FSDP_RESHARD_AFTER_FORWARD", True) and strategy not in ("SHARD_GRAD_OP", "2")
    not_applied = [f"{k}={env[k]}" for k in FSDP_NOT_APPLIED
                   if env.get(k, "").strip().lower() not in ("", "false", "none", "no_prefetch")]
    return {"reshard_after_forward": reshard, "offload_params": flag("FSDP_OFFLOAD_PARAMS", False),
            "activation_checkpointing": flag("FSDP_ACTIVATION_CHECKPOINTING", False), "not_applied": not_applied}


def describe_fsdp_options(options: dict) -> str:
    text = (f"FSDP: one shard unit per decoder layer, reshard_after_forward={options['reshard_after_forward']}, "
            f"offload_params={options['offload_params']}, "
            f"activation_checkpointing={options['activation_checkpointing']}")
    if options["not_applied"]:
        text += f"; not applied: {', '.join(options['not_applied'])}"
    return text


def shard_model(model: nn.Module, options: dict | None = None) -> None:
    """FSDP2 (torch's fully_shard): each decoder layer's weights, gradients and optimizer state are split over
    the processes and gathered only while the layer computes; the root module holds the rest (embeddings,
    final norm, LM head, tied weights included). Works with nccl on GPUs and gloo on CPU.

    options (fsdp_options): reshard_after_forward=False keeps each layer's gathered weights from the forward to
    the backward (less communication, more memory); offload_params keeps the shards and optimizer state in CPU
    memory between uses (GPU processes; on CPU there is nothing to offload to); activation_checkpointing
    recomputes each layer's activations in the backward instead of keeping them.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    options = options or fsdp_options({})
    if options["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    on_gpu = next(model.parameters()).device.type != "cpu"
    offload = CPUOffloadPolicy() if options["offload_params"] and on_gpu else OffloadPolicy()
    kwargs = {"reshard_after_forward": options["reshard_after_forward"], "offload_policy": offload}
    for layer in get_module(model, ARCHITECTURES[model_type(model)][0]):  # the decoder layers
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


@contextmanager
def original_weights(params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor]):
    """Point every parameter at its original tensor for the duration (no copying), then back."""
    current = {name: p.data for name, p in params.items()}
    for name, p in params.items():
        p.data = originals[name]
    try:
        yield
    finally:
        for name, p in params.items():
            p.data = current[name]


# ---------------------------------------------------------------------------------------------------------
# LoRA


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Names (last path part) of the linear layers inside the decoder layers: attention and MLP, never lm_head."""
    ffn_targets(model)  # fails loudly on an architecture without a layer map
    layers = model.get_submodule(ARCHITECTURES[model_type(model)][0])
    names = {path.rsplit(".", 1)[-1] for path, m in layers.named_modules()
             if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    if not names:
        raise NestuneError("found no linear layers in the decoder", "is this a decoder-only LM?")
    return sorted(names)


def attach_lora(model: nn.Module, r: int, alpha: int, dropout: float, layers: list[int] | None = None):
    """Wrap the model with a peft LoRA on every decoder linear layer (only `layers` when given)."""
    from peft import LoraConfig, get_peft_model

    layers_path = ARCHITECTURES[model_type(model)][0]
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=decoder_linear_names(model),
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores weights as (in, out)
        layers_to_transform=layers, layers_pattern=layers_path.rsplit(".", 1)[-1] if layers is not None else None,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def start_lora_off_zero(peft_model, relative: float) -> None:
    """Draw every LoRA B so that the update (scaling * B @ A) has `relative` times its base weight's RMS."""
    with torch.no_grad():
        for module in peft_model.modules():
            if not hasattr(module, "lora_B") or "default" not in module.lora_B:
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            base_rms = module.get_base_layer().weight.float().pow(2).mean().sqrt()
            a_rms = a.float().pow(2).mean().sqrt()
            # each entry of B @ A sums r products: its RMS is std(B) * sqrt(r) * rms(A)
            std = relative * base_rms / (module.scaling["default"] * math.sqrt(a.shape[0]) * a_rms)
            b.normal_(0.0, float(std))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_lora(loaded: LoadedModel, cfg: Config, rows: list[dict], run: RunFolder,
               accelerator=None) -> tuple[dict, dict]:
    t, folder = cfg.train, run.stage("train")
    examples = tokenize_examples(loaded.tokenizer, rows, t.max_length)
    torch.manual_seed(cfg.seed)  # LoRA's random initial A: the same in every run with this seed
    peft_model = attach_lora(loaded.model, t.lora_r, t.lora_alpha, t.lora_dropout)
    params = trainable_parameters(peft_model)
    trainable = sum(p.numel() for p in params.values())
    if is_main(accelerator):
        print(f"training lora (r={t.lora_r}): {trainable:,} trainable parameters", flush=True)
    stats = train_loop(peft_model, params, examples, cfg, folder,
                       loss_fn=lambda m, b: response_loss(m, b, cfg, reference=peft_model.disable_adapter),
                       pad_id=loaded.tokenizer.pad_token_id, accelerator=accelerator)
    if is_main(accelerator):
        save_peft(peft_model, loaded, cfg, folder, "lora", trainable)
    info = {"trainable_params": trainable,
            "lora": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                     "target_modules": decoder_linear_names(loaded.model)}}
    return info, stats


# ---------------------------------------------------------------------------------------------------------
# Circuit breakers (representation rerouting)


def cb_target_layers(n_layers: int) -> list[int]:
    """Layers 10 and 20 of a 32-layer model, scaled to this depth (rounded half up, within 1..n_layers).

    Layer l means hidden_states[l]: the residual stream after l decoder layers, as in the reference code.
    """
    scaled = {math.floor(n_layers * layer / CB_REFERENCE_DEPTH + 0.5) for layer in CB_REFERENCE_LAYERS}
    return sorted({min(max(layer, 1), n_layers) for layer in scaled})


def cb_layers(model) -> tuple[list[int], list[int], list[int]]:
    """(rerouted layers, layers that get a LoRA, hidden states the retain loss compares)."""
    n_layers = len(model.get_submodule(ARCHITECTURES[model_type(model)][0]))
    targets = cb_target_layers(n_layers)
    lora_layers = list(range(min(max(targets) + 1, n_layers)))
    retain_layers = list(range(1, min(max(targets) + 1, n_layers) + 1))  # every output those layers change
    return targets, lora_layers, retain_layers


def cb_coefficients(step: int, total_steps: int, alpha: float = CB_ALPHA) -> tuple[float, float]:
    """(c_retain, c_cb) at a step: the retain weight rises from 0 to alpha/2, the reroute weight falls to alpha/2."""
    frac = step / (2 * total_steps)
    return alpha * frac, alpha * (1 - frac)


def cb_examples(tokenizer, rows: list[dict], max_length: int) -> tuple[list[Example], int]:
    """One example per training row, so circuit breakers see the same rows as every other method.

    Retain (benign) rows: prompt + the original answer; every token is compared. Circuit-breaker (harmful) rows:
    prompt + the base model's own compliant answer, whose tokens are rerouted (labels mark them). A prompt the
    model refused has no harmful completion; its request tokens are rerouted instead (the reference
    implementation reroutes request and completion alike). Returns the examples and the number of completions.
    """
    examples, complied = [], 0
    for row in rows:
        if row["kind"] == "benign":
            ex = tokenize_examples(tokenizer, [row], max_length)[0]
            examples.append(Example(ex.input_ids, list(ex.input_ids), True))
        elif not row.get("own_refusal") and row.get("original"):
            examples += tokenize_examples(tokenizer, [{**row, "response": row["original"]}], max_length)
            complied += 1
        else:
            prompt = chat_prompts(tokenizer, [row["prompt"]])[0]
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:]
            examples.append(Example(ids, list(ids), False))
    return examples, complied


def hidden_states(peft_model, batch) -> tuple[torch.Tensor, ...]:
    """All hidden states of the decoder alone (the LM head's logits are not needed)."""
    decoder = peft_model.get_base_model().base_model
    out = decoder(**model_inputs(batch), output_hidden_states=True)
    return out.hidden_states


def adapted_and_original_states(peft_model, batch) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Hidden states with the LoRA (with gradients) and without it: the original model, same weights, adapter off."""
    adapted = hidden_states(peft_model, batch)
    with torch.no_grad(), peft_model.disable_adapter():
        original = hidden_states(peft_model, batch)
    return adapted, original


def cb_loss(adapted, original, batch, c_retain: float, c_cb: float, target_layers: list[int],
            retain_layers: list[int]) -> torch.Tensor:
    """c_r * L_retain + c_cb * L_cb.

    L_retain: mean L2 distance between adapted and original hidden states over the retain (benign) tokens.
    L_cb: mean ReLU(cosine(adapted, original)) at the target layers over the rerouted (harmful) tokens.
    """
    benign = batch["benign"][:, None]
    retain_mask = (batch["attention_mask"].bool() & benign).float()
    cb_mask = ((batch["labels"] != -100) & ~benign).float()
    loss = adapted[0].new_zeros((), dtype=torch.float32)
    if retain_mask.any():
        dist = torch.stack([(adapted[i].float() - original[i].float()).norm(dim=-1) for i in retain_layers]).mean(0)
        loss = loss + c_retain * (dist * retain_mask).sum() / retain_mask.sum()
    if cb_mask.any():
        cos = torch.stack([F.cosine_similarity(adapted[i].float(), original[i].float(), dim=-1)
                           for i in target_layers]).mean(0)
        loss = loss + c_cb * (F.relu(cos) * cb_mask).sum() / cb_mask.sum()
    return loss


def train_circuit_breakers(loaded: LoadedModel, cfg: Config, rows: list[dict],
                           run: RunFolder, accelerator=None) -> tuple[dict, dict]:
    t, folder = cfg.train, run.stage("train")
    examples, complied = cb_examples(loaded.tokenizer, rows, t.max_length)
    if not complied:
        print("circuit breakers: the base model refused every harmful training prompt, so there is no harmful "
              "completion; rerouting the request tokens only", flush=True)
    targets, lora_layers, retain_layers = cb_layers(loaded.model)
    torch.manual_seed(cfg.seed)  # LoRA's random initial A: the same in every run with this seed
    peft_model = attach_lora(loaded.model, CB_LORA_R, CB_LORA_ALPHA, CB_LORA_DROPOUT, layers=lora_layers)
    start_lora_off_zero(peft_model, CB_LORA_B_INIT)
    params = trainable_parameters(peft_model)
    trainable = sum(p.numel() for p in params.values())

    # The schedule needs the optimizer step; train_loop calls loss_fn grad_accum times per step and
    # resumes at an epoch boundary, so the step follows from the count of calls.
    micro_per_epoch = math.ceil(len(examples) / t.batch_size)
    steps_per_epoch = math.ceil(len(examples) / (t.batch_size * t.grad_accum))
    total = t.max_steps or steps_per_epoch * t.epochs
    resumed = (folder / "checkpoint.json").exists() and (folder / "checkpoint.safetensors").exists()
    calls = [read_json(folder / "checkpoint.json")["epoch"] * micro_per_epoch if resumed else 0]

    def loss_fn(model, batch):
        epoch, i = divmod(calls[0], micro_per_epoch)
        calls[0] += 1
        c_retain, c_cb = cb_coefficients(epoch * steps_per_epoch + i // t.grad_accum, total)
        adapted, original = adapted_and_original_states(model, batch)
        return cb_loss(adapted, original, batch, c_retain, c_cb, targets, retain_layers)

    if is_main(accelerator):
        print(f"training circuit-breakers: {trainable:,} trainable parameters (LoRA r={CB_LORA_R} on layers "
              f"0..{lora_layers[-1]}, rerouting at {targets}, {complied} harmful completions)", flush=True)
    # its loss is a mean over the batch's tokens, and its schedule counts loss calls: whole batches only
    stats = train_loop(peft_model, params, examples, cfg, folder, loss_fn=loss_fn,
                       pad_id=loaded.tokenizer.pad_token_id, accelerator=accelerator, split_by_length=False)
    if is_main(accelerator):
        save_peft(peft_model, loaded, cfg, folder, "circuit-breakers", trainable)
    info = {"trainable_params": trainable,
            "circuit_breakers": {"target_layers": targets, "lora_layers": lora_layers,
                                 "retain_layers": retain_layers, "alpha": CB_ALPHA, "total_steps": total,
                                 "lora": {"r": CB_LORA_R, "alpha": CB_LORA_ALPHA, "dropout": CB_LORA_DROPOUT,
                                          "b_init": CB_LORA_B_INIT},
                                 "harmful_completions": complied}}
    return info, stats


# ---------------------------------------------------------------------------------------------------------
# Saving


def save_peft(peft_model, loaded: LoadedModel, cfg: Config, folder, method: str, trainable: int) -> None:
    """The adapter (peft format, safetensors) in adapter-lora/, and the merged model in merged/."""
    peft_model.save_pretrained(folder / "adapter-lora", safe_serialization=True)
    loaded.model = peft_model.merge_and_unload()
    save_merged(loaded, cfg, folder, method, trainable)


def save_merged(loaded: LoadedModel, cfg: Config, folder, method: str, trainable: int,
                state_dict: dict | None = None) -> None:
    from .fold import save_checkpoint_folder

    card = (f"---\nbase_model: {cfg.model}\ntags: [nestune, safety, {method}]\n---\n"
            f"# {cfg.model} hardened with the {method} baseline\n\n"
            f"Trained by nestune as a baseline for NeST: {trainable:,} trainable parameters, lr {cfg.train.lr}. "
            "The weights are merged; the checkpoint loads with `AutoModelForCausalLM.from_pretrained`.\n")
    save_checkpoint_folder(loaded, folder / "merged", card, state_dict=state_dict)
