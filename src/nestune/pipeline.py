"""`nestune run`: detect -> cluster -> evaluate the base -> train -> fold -> evaluate the hardened model -> report.

Each stage is skipped when its DONE.json exists in the run folder, so a killed run resumes where it
stopped. The base model is loaded once (and once more in bf16 for its evaluation where the CPU computes bf16
natively while training runs in fp32: models.evaluation_dtype); the hardened model is evaluated from the folded
checkpoint on disk, which also proves that the checkpoint loads as a plain Hugging Face model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import SELECTION_METHODS, Config
from .errors import NestuneError
from .io import read_json, write_json
from .models import LoadedModel, dtype_name, evaluation_dtype, load_model
from .report import benign_shift, build_report, print_metrics, print_summary
from .runfolder import RunFolder

EVALUATED_MODEL = "evaluated_model.json"  # in RUN/eval: which model (and adapter, dtype) its answers are from


def load(cfg: Config, spec: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """The run's model (or `spec`) as the settings ask: device, dtype (or `dtype`), device map, remote code."""
    return load_model(spec or cfg.model, cfg.device, cfg.dtype if dtype is None else dtype,
                      device_map=cfg.device_map or None, max_memory=cfg.max_memory or None,
                      trust_remote_code=cfg.trust_remote_code)


def eval_dtype(cfg: Config) -> torch.dtype:
    return evaluation_dtype(cfg.dtype, cfg.device)


def load_for_eval(cfg: Config, spec: str | None = None, base: LoadedModel | None = None) -> LoadedModel:
    """The model evaluated, in the evaluation's dtype (bf16 on a CPU with native bf16 while training runs in
    fp32): `base` itself when it is already in that dtype, else a copy loaded in it."""
    dtype = eval_dtype(cfg)
    return base if base is not None and base.model.dtype == dtype else load(cfg, spec, dtype)


def evaluate_stage(cfg: Config, run: RunFolder, stage: str, loaded: LoadedModel) -> dict:
    from .evaluate.run import evaluate_model

    start = time.perf_counter()
    metrics = evaluate_model(loaded, cfg, run.stage(stage))
    info = {"wall_s": round(time.perf_counter() - start, 1)}
    if stage == "eval-after":
        # Kept beside the 20 MB logprob files it comes from, so that it survives their deletion; a mismatch
        # is reported once, by the report or comparison row that every evaluation after is followed by
        shift = benign_shift(run, warn=False)
        info["benign_kl"], info["benign_shift"] = (shift or {}).get("kl"), shift
    run.mark_done(stage, info)
    return metrics


def run_pipeline(cfg: Config, evaluate: bool = True) -> dict:
    from .cluster import run_cluster
    from .detect import run_detect
    from .fold import run_fold
    from .train import run_train

    run = RunFolder(cfg.out)
    run.check_resumable(cfg)
    run.save_config(cfg)
    timings = read_json(run.path / "timings.json") if (run.path / "timings.json").exists() else {}
    base: LoadedModel | None = None

    def base_model() -> LoadedModel:
        nonlocal base
        if base is None:
            base = load(cfg)
        return base

    def stage(name: str, fn) -> None:
        if run.done(name):
            print(f"[{name}] already complete in {run.path / name}; skipping", flush=True)
            return
        print(f"[{name}]", flush=True)
        run.mark_started(name)
        start = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - start, 1)
        write_json(run.path / "timings.json", timings)

    needs_selection = cfg.train.method in SELECTION_METHODS
    if needs_selection:
        stage("detect", lambda: run_detect(cfg, run, loaded=base_model()))
        stage("cluster", lambda: run_cluster(cfg, run))
    if evaluate:
        stage("eval-before", lambda: evaluate_stage(cfg, run, "eval-before", load_for_eval(cfg, base=base_model())))
    stage("train", lambda: run_train(cfg, run, loaded=base_model()))
    stage("fold", lambda: run_fold(cfg, run, loaded=base_model()))
    base = None  # folding changed its weights in place; the hardened model is read back from disk
    if evaluate:
        folded = str(run.path / "fold" / "model")
        stage("eval-after", lambda: evaluate_stage(cfg, run, "eval-after", load_for_eval(cfg, folded)))
        paths = build_report(run)
        print_summary(run)
        print(f"\nreport: {paths['html']}\nhardened model: {folded}", flush=True)
    return timings


def evaluated_model(cfg: Config, adapter: str | None) -> dict:
    """What `nestune eval` evaluates: the model (a path made absolute), the adapter if any and the share of it
    applied (fold.scale, recorded when not 1), the dtype."""
    model = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    scale = {"scale": cfg.fold.scale} if adapter and cfg.fold.scale != 1 else {}
    return {"model": model, "adapter": str(Path(adapter).resolve()) if adapter else None,
            "dtype": dtype_name(eval_dtype(cfg)), **scale}


def _describe(model: dict) -> str:
    adapter = f" with adapter '{model['adapter']}'" if model.get("adapter") else ""
    adapter += f" at scale {model['scale']:g}" if "scale" in model else ""
    return f"'{model.get('model')}'{adapter} (dtype {model.get('dtype')})"


def check_evaluated_model(eval_dir: Path, model: dict) -> None:
    """An evaluation folder reuses its saved answers, so it must hold one model's: refuse another's.

    Without this, `nestune eval --model B --out DIR` after `--model A` reported A's answers as B's.
    """
    path = eval_dir / EVALUATED_MODEL
    saved = read_json(path) if path.exists() else None
    if saved is not None and saved != model:
        raise NestuneError(f"'{eval_dir}' holds the answers of {_describe(saved)}, not of {_describe(model)}",
                           f"use a new --out folder for this model, or delete {eval_dir}")
    write_json(path, model)


def eval_command(cfg: Config, adapter: str | None = None) -> dict:
    """`nestune eval`: evaluate one model (base, folded, or base + adapter) into RUN/eval."""
    from .tuner import NeSTAdapter, check_same_base

    if adapter and cfg.eval.generator == "vllm":
        raise NestuneError("vLLM reads the model's weights from disk, so it would evaluate the model without "
                           "the adapter", "fold it first (`nestune apply --adapter A --model M --out DIR`) and "
                           "evaluate DIR, or use --generator hf")
    if adapter and cfg.fold.drop_clusters:
        raise NestuneError("fold.drop_clusters needs the run folder the adapter was trained in (its training "
                           "targets and prompts)", "fold it there: `nestune fold --run RUN --set "
                           f"fold.drop_clusters={cfg.fold.drop_clusters}`, then evaluate RUN/fold/model")
    run = RunFolder(cfg.out)
    check_evaluated_model(run.stage("eval"), evaluated_model(cfg, adapter))
    loaded = load_for_eval(cfg)
    if adapter:
        nest, config = NeSTAdapter.load(adapter)
        check_same_base(config, loaded.model)
        nest.scale(cfg.fold.scale).attach(loaded.model)
    metrics = evaluate_stage(cfg, run, "eval", loaded)
    print_metrics(metrics)
    return metrics
