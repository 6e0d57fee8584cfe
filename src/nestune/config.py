"""One typed configuration for every stage.

Layers, later wins: defaults < preset (`default` or `smoke`) < config file (TOML) < environment
(`NESTUNE_<SECTION>__<KEY>`, e.g. `NESTUNE_TRAIN__LR=1e-3`) < command-line flags (`--set train.lr=1e-3`
or the named flags of each subcommand). The resolved config is saved as `config.json` in every run folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import NestuneError


@dataclass
class DetectConfig:
    harmful: str = "advbench"  # bundled set name or file; only its `detect` split is used
    benign: str = "benign-qa"
    n_prompts: int = 160  # per class (harmful and benign are balanced)
    min_prompts: int = 16  # fewer per class than this gives probes too little to learn from
    batch_size: int = 16
    max_length: int = 256  # prompt tokens; longer prompts are cut from the left of the user text
    probe_epochs: int = 5000
    probe_lr: float = 1e-3
    probe_weight_decay: float = 1e-3
    heldout_fraction: float = 0.25  # of the detect prompts, kept out of probe training for the AUC
    z_threshold: float = 3.0
    sign: str = "positive"  # positive: more active on harmful prompts; negative; both (|z|)
    # max: each neuron's largest value over the prompt's tokens (the paper's); last: its value at the last
    # prompt token, the position the answer starts from (where refusal is decided)
    pool: str = "max"


@dataclass
class ClusterConfig:
    scope: str = "module"  # module, layer or global
    # silhouette picks k in 2..k_max. 16, not 8: on qwen2.5-coder-0.5b 8 capped one to three large modules, and
    # 16 gave mean ASR 13.3 -> 7.9% (seed 0) and 19.6 -> 16.7% (seed 1), over-refusal 45 -> 42.5% and 42.5%,
    # ARC within 3 questions either way; smollm2-135m's clusters stay the same, and 32 gives qwen's of 16: no module
    # there takes more than 14 (docs/experiments.md)
    k_max: int = 16
    n_init: int = 10


@dataclass
class TrainConfig:
    method: str = "nest"  # nest, full, lora, circuit-breakers, neurons, random
    n_harmful: int = 96  # harmful prompts from the train split
    n_benign: int = 96  # benign prompts whose original answers are kept
    # the set training's harmful prompts come from (its train part); "" = detect.harmful's. Sets joined with "+"
    # share n_harmful equally, e.g. advbench+harmbench-standard
    harmful: str = ""
    # the set training's benign prompts come from (its train part); "" = detect.benign's. Sets joined with "+"
    # share n_benign equally, e.g. benign-qa+mt-bench+vicuna: questions and chat requests (docs/experiments.md)
    benign: str = ""
    # safe prompts that look unsafe (the train part of eval.overrefusal; evaluation uses its held-out part),
    # kept answering as the original model did; 0 by default: what they take off over-refusal they add to the
    # ASR (smollm2: 20% -> 15% and 20% -> 33%; qwen, linear decay: 45% -> 27.5% and 13.3% -> 22.1%;
    # docs/experiments.md)
    n_lookalike: int = 0
    # share of the benign prompts asked in a benign framing (a persona, an ELI5 or a style instruction:
    # train.BENIGN_FRAMINGS; no jailbreak template), answered as the original model did; framed prompts it refuses
    # are left out. 0 by default: on qwen2.5-coder-0.5b with prefill_fraction 0.5, half framed gave over-refusal
    # 22.5% once and 47.5% with another sample of the same prompts, and 30% on seed 2 (docs/experiments.md)
    benign_framed: float = 0.0
    # 3 (72 steps of 8): measured on smollm2-135m against 2, same detection and targets: DAN 8 96% -> 0% and role
    # play 100% -> 38% attack success, over-refusal unchanged (20%), ARC-Easy 53.3% -> 51.7%
    # (docs/experiments.md)
    epochs: int = 3
    max_steps: int = 0  # 0: no step limit (epochs decide)
    batch_size: int = 8
    grad_accum: int = 1
    # 0: the method's default (train.METHOD_LR: LoRA 2e-4, full 2e-5; NeST 0.5, relative: each delta's step
    # is lr x the RMS of the weight rows it changes, so one value fits models whose weights differ in scale)
    lr: float = 0.0
    weight_decay: float = 0.0
    # constant, linear or cosine (both decay to 0 at the last step). Linear: on smollm2-135m, seeds 0-3, same
    # detection and targets, mean ASR 20.1% -> 7.6% against constant, utility nearer the base (README)
    lr_schedule: str = "linear"
    # Batches of similar length (train.epoch_batches): on smollm2-135m 20% less train time, but the batches'
    # new make-up moved each seed's ASR by up to 13 points either way (seeds 0-3, docs/experiments.md); off by
    # default
    group_by_length: bool = False
    # On CPU, run each batch as a few length-sorted parts and add their gradients (train.length_parts): the same
    # examples and update as one padded forward, up to rounding, with less padding (padded tokens 1.34x -> 1.09x
    # the real ones and training loop 0.91x the time on smollm2-135m, 1.39x -> 1.11x and 0.78x on
    # qwen2.5-coder-0.5b; BENCHMARKS.md). Not on GPU, where it is unmeasured
    split_by_length: bool = True
    # harmful examples that open affirmatively, then refuse (train.py). 0.5, measured: qwen over-refusal 45% -> 27.5%
    # at the same ASR, but smollm2-135m seeds 0-1 ASR 8.3/4.2% -> 12.5/22.5% (docs/experiments.md)
    prefill_fraction: float = 0.25
    # input (the paper's): each cluster's vector is added to the neurons' input-projection rows; output (our
    # option): to their columns of the FFN output projection, so a neuron's change scales with its own activation
    # (docs/method.md, docs/experiments.md)
    update_side: str = "input"
    # Keep each input-side update out of the FFN-input directions that hold all but this share of the energy of
    # training's benign prompts and the safe look-alikes evaluation never reads (our option, src/nestune/protect.py);
    # 0 = off. 0.05 on qwen2.5-coder-0.5b seeds 0 and 2: over-refusal at the base's, plain requests and prefill
    # closed, but most jailbreak templates stay open (ASR 40% and 47%; docs/experiments.md)
    protect: float = 0.0
    benign_loss: str = "answer"  # answer: cross-entropy to the original answer; kl: KL to the original
    benign_weight: float = 1.0
    answer_tokens: int = 48  # length of the cached original answers and of refusal targets
    max_length: int = 256
    bf16: bool = False  # autocast in bf16 (GPU)
    fsdp: bool = False  # full fine-tuning under `accelerate launch`: shard weights and optimizer state (FSDP2)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05


@dataclass
class FoldConfig:
    # The share of the trained update written into the weights: 1 folds all of it; below 1 leaves the model part
    # of the way to the base (trading attack success for over-refusal and utility), above 1 goes further. A
    # post-hoc knob: changing it refolds and re-evaluates without training again (docs/experiments.md)
    scale: float = 1.0
    # Leave out the N clusters that most make safe prompts refused (our option, src/nestune/attribution.py): each
    # cluster's share of the refusal is measured on harmful training prompts and on safe look-alikes that evaluation
    # never sees, and the N whose look-alike share most exceeds their harmful share are not folded. 0 folds all.
    drop_clusters: int = 0


@dataclass
class EvalConfig:
    behaviours: str = "advbench"  # only its `heldout` split is used when it is the detect/train set
    n_behaviours: int = 24
    attacks: str = "default"  # default, all, or a comma list of template names plus none/prefill
    max_new_tokens: int = 64
    max_length: int = 2048  # prompt tokens; the longest default template (AIM) is ~450 tokens
    # Rows per generation batch (and per KL forward; multiple choice uses at most 16). A decode step reads every
    # weight whatever the batch, so tokens/s grows with it (smollm2 on CPU, 443-token attack prompts: 129
    # tokens/s at 64 rows, 169 at 256; BENCHMARKS.md): the default evaluation's 240 attack prompts make one
    # batch. Halved on out-of-memory.
    batch_size: int = 256
    judge: str = "refusal"  # refusal, hf:<classifier model>, openai:<base url>#<model>
    overrefusal: str = "overrefusal"
    n_overrefusal: int = 40
    utility_tasks: str = "arc-easy,arc-challenge,mmlu,gsm8k"
    n_utility: int = 60  # items per multiple-choice task
    n_gsm8k: int = 10
    gsm8k_max_new_tokens: int = 256  # enough for a short chain of thought
    n_kl: int = 32  # benign prompts for the next-token KL
    bootstrap: int = 1000
    generator: str = "hf"  # hf or vllm


@dataclass
class AttackConfig:
    """White-box robustness attacks (`nestune attack`, robustness.py); sizes otherwise come from eval/detect."""

    direction_layer: int = 0  # refusal direction at this layer's input; 0: the best of a few middle layers
    n_select: int = 16  # held-out harmful prompts (train split) that choose the direction's layer
    finetune_steps: int = 20  # harmful-finetune: LoRA steps (train.batch_size pairs each)
    finetune_lr: float = 1e-3


@dataclass
class Config:
    model: str = "smollm2-135m"
    out: str = "runs/latest"
    preset: str = "default"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    device_map: str = ""  # "" (one device) or "auto"
    max_memory: str = ""  # with device_map: per-device budget, e.g. "0=20GiB,1=20GiB,cpu=60GiB" ("" = all of it)
    trust_remote_code: bool = False
    detect: DetectConfig = field(default_factory=DetectConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fold: FoldConfig = field(default_factory=FoldConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("detect", "cluster", "train", "fold", "eval", "attack")

# The smoke preset runs the whole line on smollm2-135m in about a minute: for tests and quick checks.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "detect": {"n_prompts": 24, "min_prompts": 8, "probe_epochs": 500, "max_length": 96, "z_threshold": 2.0},
        "cluster": {"k_max": 4, "n_init": 3},
        "train": {"n_harmful": 12, "n_benign": 12, "epochs": 1, "answer_tokens": 16, "max_length": 128},
        "eval": {"n_behaviours": 4, "attacks": "none,prefill,aim", "max_new_tokens": 24, "n_overrefusal": 4,
                 "n_utility": 8, "n_gsm8k": 2, "gsm8k_max_new_tokens": 32, "n_kl": 4, "bootstrap": 200, "utility_tasks": "arc-easy"},
        "attack": {"n_select": 4, "finetune_steps": 10},
    },
}


def _coerce(value: str, typ: type, key: str):
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise NestuneError(f"setting {key}: '{value}' is not a boolean", "use true or false")
    try:
        return typ(value)
    except ValueError:
        wanted = "a whole number, e.g. 8" if typ is int else "a number, e.g. 0.01"
        raise NestuneError(f"setting {key}: '{value}' is not a valid {typ.__name__}", f"give {key} {wanted}") from None


def _field_types(obj) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: hints.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            for f in dataclasses.fields(obj)}


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.key` or a top-level `key`; strings are converted to the field's type."""
    parts = key.replace("-", "_").split(".")
    target = cfg
    if len(parts) == 2 and parts[0] in SECTIONS:
        target = getattr(cfg, parts[0])
    elif len(parts) != 1 or parts[0] in SECTIONS:
        raise NestuneError(f"unknown setting '{key}'", f"use section.key with a section in {', '.join(SECTIONS)}")
    name = parts[-1]
    types = _field_types(target)
    if name not in types:
        raise NestuneError(f"unknown setting '{key}'", f"known keys here: {', '.join(types)}")
    typ = types[name]
    if isinstance(value, str) and typ is not str:
        value = _coerce(value, typ, key)
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):  # a config file's 1.5 for an int
        wanted = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}[typ]
        raise NestuneError(f"setting {key}: {value!r} is not {wanted}", f"give {key} {wanted}")
    setattr(target, name, value)


# Values outside these make a stage fail late (or divide by zero); checked once, when the config is resolved.
CHOICES = {
    "detect.sign": ("positive", "negative", "both"),
    "cluster.scope": ("module", "layer", "global"),
    "train.method": ("nest", "full", "lora", "circuit-breakers", "neurons", "random"),
    "train.benign_loss": ("answer", "kl"),
    "train.lr_schedule": ("constant", "linear", "cosine"),
    "train.update_side": ("input", "output"),
}
AT_LEAST_ONE = ("detect.batch_size", "detect.max_length", "detect.probe_epochs", "cluster.k_max", "cluster.n_init",
                "train.batch_size", "train.grad_accum", "train.answer_tokens", "train.max_length",
                "eval.max_new_tokens", "eval.max_length", "eval.batch_size", "attack.n_select",
                "attack.finetune_steps")
FRACTIONS = ("train.prefill_fraction", "train.benign_framed", "train.protect")
SELECTION_METHODS = ("nest", "neurons", "random")  # these train on the detected neurons
MAY_BE_NEGATIVE = ("detect.z_threshold",)


def validate(cfg: Config) -> None:
    """Refuse values no stage can work with, naming the setting."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in SECTIONS}
    for section in SECTIONS:
        sub = getattr(cfg, section)
        values.update({f"{section}.{f.name}": getattr(sub, f.name) for f in dataclasses.fields(sub)})
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise NestuneError(f"setting {key}: unknown value '{values[key]}'", f"use one of {', '.join(allowed)}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = 1 if key in AT_LEAST_ONE else 0
        if key not in MAY_BE_NEGATIVE and value < low:
            raise NestuneError(f"setting {key} must be at least {low}, not {value}", f"--set {key}=<{low} or more>")
        if key in FRACTIONS and value > 1:
            raise NestuneError(f"setting {key} must be between 0 and 1, not {value}", f"--set {key}=0.25")
    if cfg.train.protect and (cfg.train.update_side != "input" or cfg.train.method not in SELECTION_METHODS):
        raise NestuneError("train.protect applies to NeST's input-side updates (train.method nest, neurons or random, "
                           f"train.update_side input), not to train.method={cfg.train.method} with "
                           f"train.update_side={cfg.train.update_side}", "drop train.protect for this run")
    if not cfg.train.epochs and not cfg.train.max_steps:
        raise NestuneError("train.epochs and train.max_steps are both 0: nothing to train",
                           "--set train.epochs=1 (or train.max_steps=N)")


def _apply_tree(cfg: Config, tree: dict, origin: str) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                set_value(cfg, f"{key}.{sub}", v)
        else:
            set_value(cfg, key, value)


def load_config(
    config_file: str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Resolve the layered configuration. `overrides` are the command-line values (None = not given)."""
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_tree: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise NestuneError(f"config file '{config_file}' does not exist", "check the path")
        try:
            file_tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise NestuneError(f"config file '{config_file}' is not valid TOML: {e}", "fix the file") from None
    env = {k[len("NESTUNE_"):].lower().replace("__", "."): v for k, v in environ.items()
           if k.startswith("NESTUNE_") and k not in ("NESTUNE_CACHE",)}

    # The preset itself can come from any layer; the highest one that names it wins.
    chosen = overrides.get("preset") or env.get("preset") or file_tree.get("preset") or preset or "default"
    if chosen not in PRESETS:
        raise NestuneError(f"unknown preset '{chosen}'", f"use one of {', '.join(PRESETS)}")
    cfg = Config(preset=chosen)
    _apply_tree(cfg, PRESETS[chosen], "preset")
    _apply_tree(cfg, file_tree, "config file")
    for key, value in env.items():
        set_value(cfg, key, value)
    for key, value in overrides.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = Config()
    _apply_tree(cfg, tree, "saved config")
    return cfg
