"""Folding: write the hardened model as an ordinary Hugging Face checkpoint (DESIGN.md 1.4).

The folded folder (safetensors + config + tokenizer + a model card) loads with
AutoModelForCausalLM.from_pretrained and needs nestune for nothing. It is written to a temporary folder
and renamed into place, so an interrupted fold never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import Config
from .errors import DISK_FIX, NestuneError
from .io import read_json, rounded, write_json
from .models import LoadedModel, load_model
from .runfolder import RunFolder

SPACE_MARGIN = 64 * 1024**2  # the tokenizer, config and model card beside the weights


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the disk cannot hold `needed` bytes: a checkpoint that fills the disk halfway costs
    the stage's time and leaves the disk full for whatever runs next."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        gib = 1024**3
        raise NestuneError(f"the checkpoint needs about {needed / gib:.1f} GiB in {folder}, and the disk has "
                           f"{free / gib:.1f} GiB free", DISK_FIX)


def save_checkpoint_folder(loaded: LoadedModel, out: Path, card: str, state_dict: dict | None = None) -> None:
    """The model as a Hugging Face folder (safetensors), written atomically; `state_dict` replaces its weights
    (the gathered weights of a sharded model)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = loaded.model
    weights = state_dict if state_dict is not None else model.state_dict()
    # Tied weights (embedding and LM head) share storage and are saved once
    unique = {(t.data_ptr() or id(t)): t for t in weights.values()}
    check_free_space(out.parent, sum(t.numel() * t.element_size() for t in unique.values()))
    model.hf_quantizer = None  # a GGUF-loaded model keeps a quantizer that cannot be serialised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    loaded.tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def model_card(cfg: Config, run: RunFolder, adapter_config: dict, drop_note: str | None = None) -> str:
    detect = read_json(run.path / "detect" / "DONE.json") if run.done("detect") else {}
    train = read_json(run.path / "train" / "summary.json") if (run.path / "train" / "summary.json").exists() else {}
    output_side = any(t.get("side") == "output" for t in adapter_config.get("targets") or [])
    lines = [
        "---",
        f"base_model: {cfg.model}",
        "tags: [nestune, safety, neuron-selective-tuning]",
        "---",
        f"# {Path(cfg.model).name} hardened with nestune ({adapter_config.get('method', 'nest')})",
        "",
        "This checkpoint is the base model with NeST (Neuron Selective Tuning) cluster updates folded into "
        + ("the selected neurons' columns of the feed-forward output projections (`train.update_side=output`). "
           "Every weight outside those columns" if output_side else
           "the feed-forward input projections. Every weight outside the updated rows")
        + " is bit-identical to the base model. It loads with `AutoModelForCausalLM.from_pretrained` and needs no "
        "extra code.",
        "",
        "| what | value |",
        "|---|---|",
        f"| base model | `{cfg.model}` (weights hash `{adapter_config.get('base_weights_hash')}`) |",
        f"| safety neurons updated | {train.get('n_neurons', '?')} in {train.get('n_clusters', '?')} clusters |",
        f"| trainable parameters | {adapter_config.get('trainable_parameters', '?'):,} |",
        f"| detection | z > {cfg.detect.z_threshold}, mean probe AUC {rounded(detect.get('mean_auc', '?'))} |",
        f"| training | {train.get('steps', '?')} steps, {train.get('n_harmful', '?')} harmful + "
        f"{train.get('n_benign', '?')} benign prompts, final loss {rounded(train.get('final_loss', '?'))} |",
        *([f"| kept out of the safe prompts' FFN inputs (train.protect) | all but {train['protect']:g} of the energy "
           f"of {train['protected_prompts']} benign and safe look-alike prompts |"] if train.get("protect") else []),
        f"| share of the trained update folded in | {cfg.fold.scale:g} (fold.scale) |",
        *([f"| clusters left out (fold.drop_clusters) | {drop_note} |"] if drop_note else []),
        "",
        "Evaluation results, when the run evaluated the model, are in the run folder's `results.json` and "
        "`report.html`.",
        "",
    ]
    return "\n".join(lines)


def run_fold(cfg: Config, run: RunFolder, loaded: LoadedModel | None = None) -> Path:
    """Fold RUN/train/adapter into the base model and save it to RUN/fold/model."""
    from .attribution import clusters_to_drop, describe_drop, drop_clusters, run_attribution
    from .tuner import NeSTAdapter, check_same_base

    train_dir = run.require("train", "run `nestune train --run RUN` first")
    out = run.stage("fold") / "model"
    merged = train_dir / "merged"  # baselines that merge while training (LoRA, full) leave their model here
    scale = cfg.fold.scale
    if merged.exists():
        if scale != 1 or cfg.fold.drop_clusters:
            setting = f"fold.scale={scale}" if scale != 1 else f"fold.drop_clusters={cfg.fold.drop_clusters}"
            raise NestuneError(f"{setting} applies to NeST updates, but '{train_dir}' holds a baseline's "
                               "merged model (LoRA, full fine-tuning or circuit breakers)",
                               "leave fold.scale at 1 and fold.drop_clusters at 0 for the baselines")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(merged, out)
        run.mark_done("fold", {"path": str(out)})
        return out
    adapter_dir = train_dir / "adapter"
    if not adapter_dir.exists():
        raise NestuneError(f"no adapter in '{train_dir}'", "rerun `nestune train`")
    if cfg.fold.drop_clusters < 0:
        raise NestuneError(f"fold.drop_clusters={cfg.fold.drop_clusters} is negative",
                           "give the number of clusters to leave out, e.g. 5, or 0 to fold them all")
    loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    adapter, config = NeSTAdapter.load(adapter_dir)
    check_same_base(config, loaded.model)
    dropped, note = [], None
    if cfg.fold.drop_clusters:
        attribution = run_attribution(cfg, run, loaded, adapter)
        dropped = clusters_to_drop(attribution, cfg.fold.drop_clusters)
        drop_clusters(adapter, dropped)
        note = describe_drop(attribution, dropped)
        print(note, flush=True)
    adapter.scale(scale).fold(loaded.model)
    save_checkpoint_folder(loaded, out, model_card(cfg, run, config, note))
    write_json(run.stage("fold") / "summary.json", {"path": str(out), "trainable_params": config.get(
        "trainable_parameters"), "scale": scale, "dropped_clusters": dropped, "drop_note": note})
    run.mark_done("fold", {"path": str(out)})
    print(f"folded model written to {out}", flush=True)
    return out


def apply_adapter(adapter_dir: str, model_spec: str, out: str, device="auto", dtype="auto", scale=1.0) -> Path:
    """`nestune apply`: fold a saved adapter, its updates times `scale`, into its base model and save the result."""
    from .tuner import NeSTAdapter, check_same_base

    if scale < 0:
        raise NestuneError(f"--scale {scale} is negative: it would reverse the trained update",
                           "give a share between 0 and 1 (or above 1 to go further), e.g. --scale 0.75")
    adapter, config = NeSTAdapter.load(adapter_dir)
    loaded = load_model(model_spec, device, dtype)
    check_same_base(config, loaded.model)
    adapter.scale(scale).fold(loaded.model)
    card = (f"# {model_spec} + NeST adapter\n\nFolded from `{adapter_dir}` by `nestune apply` "
            f"({config.get('trainable_parameters')} trainable parameters, scale {scale:g}).\n")
    save_checkpoint_folder(loaded, Path(out), card)
    return Path(out)
