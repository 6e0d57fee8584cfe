"""The `nestune` command: a subcommand per stage, and `run` for the whole line.

Every subcommand takes the same configuration layers (see config.py): --config FILE, --preset, and
--set section.key=value, plus named flags for the common settings. Problems the user can fix end with a
one-line `error: <cause> -- <fix>` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import NestuneError, disk_full


def _common(p: argparse.ArgumentParser, run_required: bool = False) -> None:
    p.add_argument("--model", help="catalog alias (see `nestune models`), local folder, .gguf file or hub id")
    p.add_argument("--out", "--run", dest="out", required=run_required, help="run folder")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--preset", choices=["default", "smoke"], help="default: the real run; smoke: tiny sizes")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", help="auto (bf16 on GPU; fp32 on CPU, evaluating in bf16 on CPUs with native "
                   "bf16), fp32, bf16, fp16")
    p.add_argument("--device-map", dest="device_map", help="'auto' to spread a large model over devices")
    p.add_argument("--max-memory", dest="max_memory", help="with --device-map: e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_const", const=True,
                   help="allow the model repository's own code to run")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set detect.z_threshold=2.5 (repeatable)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake ends like every other error: one line, cause -- fix, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} -- see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nestune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nestune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the bundled model catalog")
    sub.add_parser("data", help="list the bundled data sets with row counts, source and licence")

    p = sub.add_parser("detect", help="find safety neurons with linear probes")
    _common(p)
    p.add_argument("--harmful", help="harmful prompts: bundled set name or file (txt, csv, jsonl, parquet)")
    p.add_argument("--benign", help="benign prompts: bundled set name or file")
    p.add_argument("--z-threshold", dest="z_threshold", type=float)

    p = sub.add_parser("cluster", help="group each module's safety neurons with k-means")
    _common(p, run_required=True)
    p.add_argument("--scope", choices=["module", "layer", "global"])
    p.add_argument("--k-max", dest="k_max", type=int)

    p = sub.add_parser("train", help="train the shared cluster updates (or a baseline with --method)")
    _common(p, run_required=True)
    p.add_argument("--method", choices=["nest", "full", "lora", "circuit-breakers", "neurons", "random"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)

    p = sub.add_parser("fold", help="write the hardened model as a standard Hugging Face checkpoint")
    _common(p, run_required=True)
    p.add_argument("--scale", type=float, help="share of the trained update folded in (fold.scale, default 1)")

    p = sub.add_parser("apply", help="fold a saved NeST adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--out", required=True, help="folder for the folded checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scale", type=float, default=1.0, help="share of the trained update folded in (default 1)")

    p = sub.add_parser("eval", help="evaluate a model: attack success, over-refusal, utility")
    _common(p)
    p.add_argument("--adapter", help="evaluate the model with this NeST adapter applied")
    p.add_argument("--judge", help="refusal (default), hf:<classifier>, openai:<base_url>#<model>")
    p.add_argument("--attacks", help="default, all, or a comma list (none, prefill, template names)")
    p.add_argument("--generator", choices=["hf", "vllm"])

    p = sub.add_parser("run", help="the whole line: detect, cluster, train, fold, evaluate, report")
    _common(p)
    p.add_argument("--method", choices=["nest", "full", "lora", "circuit-breakers", "neurons", "random"])
    p.add_argument("--harmful")
    p.add_argument("--benign")
    p.add_argument("--judge")
    p.add_argument("--no-eval", dest="no_eval", action="store_true", help="stop after folding")

    p = sub.add_parser("compare", help="NeST and the baselines through the same data, budget and evaluation")
    _common(p, run_required=True)
    p.add_argument("--methods", default="nest,lora,full,circuit-breakers,neurons,random",
                   help="comma list of: nest, neurons, random, full, lora, circuit-breakers")
    p.add_argument("--harmful")
    p.add_argument("--benign")
    p.add_argument("--judge")
    p.add_argument("--no-eval", dest="no_eval", action="store_true", help="train and fold only")

    p = sub.add_parser("attack", help="white-box robustness attacks on the base and hardened models of a run")
    _common(p, run_required=True)
    p.add_argument("--attacks", dest="robustness_attacks", metavar="LIST",
                   help="comma list of neuron-pruning, refusal-direction, harmful-finetune (default: all three)")
    p.add_argument("--judge")
    p.add_argument("--harmful", help="harmful prompts for re-detection and the refusal direction")
    p.add_argument("--benign", help="benign prompts for re-detection and the refusal direction")
    p.add_argument("--methods", help="in a `nestune compare` folder: the methods whose models to attack "
                                     "(comma list; default: every method with a folded model)")

    p = sub.add_parser("report", help="(re)build report.html and report.md of a run folder")
    p.add_argument("--out", "--run", dest="out", required=True)
    return parser


# Named flags -> config keys
FLAG_KEYS = {
    "model": "model", "out": "out", "preset": "preset", "seed": "seed", "device": "device", "dtype": "dtype",
    "device_map": "device_map", "max_memory": "max_memory", "trust_remote_code": "trust_remote_code",
    "harmful": "detect.harmful", "benign": "detect.benign", "z_threshold": "detect.z_threshold",
    "scope": "cluster.scope", "k_max": "cluster.k_max",
    "method": "train.method", "epochs": "train.epochs", "lr": "train.lr", "scale": "fold.scale",
    "judge": "eval.judge", "attacks": "eval.attacks", "generator": "eval.generator",
}


def resolve_config(args):
    """Layers: defaults < preset < config file < environment < flags; a run folder's saved model is reused."""
    from .config import load_config
    from .runfolder import RunFolder

    overrides = {}
    for setting in args.settings:
        if "=" not in setting:
            raise NestuneError(f"--set '{setting}' is not KEY=VALUE", "e.g. --set train.lr=0.01")
        key, value = setting.split("=", 1)
        overrides[key.strip()] = value.strip()
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if "model" not in overrides and getattr(args, "out", None):
        saved = RunFolder(args.out).saved_config()
        if saved:  # later stages of a run use the model the run was started with
            overrides["model"] = saved["model"]
    return load_config(config_file=args.config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dispatch(args)
    except NestuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed stages are saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a full disk is the user's to fix too; anything else keeps its traceback
        full = disk_full(e)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        sys.exit(2)
    return 0


def dispatch(args) -> None:
    cmd = args.command
    if cmd == "models":
        return list_models()
    if cmd == "data":
        return list_data()
    if cmd == "apply":
        from .fold import apply_adapter

        out = apply_adapter(args.adapter, args.model, args.out, args.device, args.dtype, args.scale)
        print(f"folded model written to {out}")
        return
    if cmd == "report":
        from .report import build_report
        from .runfolder import RunFolder

        RunFolder(args.out).require_run()
        paths = build_report(RunFolder(args.out))
        print(f"report: {paths['html']}")
        return

    from .runfolder import RunFolder

    cfg = resolve_config(args)
    if cmd != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by `accelerate launch`
        raise NestuneError(f"`nestune {cmd}` runs in one process; only `train` is data parallel",
                           "run `accelerate launch -m nestune train --run RUN`, the other stages without it")
    run = RunFolder(cfg.out)
    if cmd == "detect":
        from .detect import run_detect

        run.save_config(cfg)
        run_detect(cfg, run)
    elif cmd == "cluster":
        from .cluster import run_cluster

        run.save_config(cfg)
        run_cluster(cfg, run)
    elif cmd == "train":
        from .train import run_train

        run.save_config(cfg)
        run_train(cfg, run)
    elif cmd == "fold":
        from .fold import run_fold

        run_fold(cfg, run)
    elif cmd == "eval":
        from .pipeline import eval_command

        eval_command(cfg, adapter=args.adapter)
    elif cmd == "run":
        from .pipeline import run_pipeline

        run_pipeline(cfg, evaluate=not args.no_eval)
    elif cmd == "attack":
        from .robustness import attack_command

        attack_command(cfg, cfg.out, args.robustness_attacks, args.methods)
    elif cmd == "compare":
        from .compare import run_compare

        run_compare(cfg, args.methods, cfg.out, evaluate=not args.no_eval)


def list_models() -> None:
    from rich.table import Table

    from .assets import MODEL_CATALOG
    from .io import console

    table = Table(title="nestune model catalog (fetched from PyPI on first use)")
    for col in ("alias", "model", "arch", "layers", "d_model", "d_ff", "size", "licence"):
        table.add_column(col)
    for alias, m in MODEL_CATALOG.items():
        table.add_row(alias, m["description"], m["arch"], str(m["layers"]), str(m["d_model"]), str(m["d_ff"]),
                      f"{m['size_mb']} MB", m["licence"])
    console().print(table)
    print("Any local Hugging Face folder, .gguf file or (online) hub id works as --model too.")


def list_data() -> None:
    from rich.table import Table

    from .data import dataset_table
    from .io import console

    rows = dataset_table()
    table = Table(title="bundled data sets")
    for col in ("name", "kind", "rows", "source package", "licence"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"], str(r.get("rows", "?")), r["package"], r["licence"])
    console().print(table)
    print("Your own files work too: --harmful FILE (txt one prompt per line; csv/jsonl/parquet with a column).")


if __name__ == "__main__":
    main()
