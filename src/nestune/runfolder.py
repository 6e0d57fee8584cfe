"""The run folder: each stage reads the previous stage's artifacts and writes its own.

    RUN/config.json          resolved configuration of the latest invocation
    RUN/<stage>/...          artifacts of a stage (detect, cluster, train, fold, eval-before, eval-after, ...)
    RUN/<stage>/STARTED.json the settings the stage started with (`stage_settings`), written first
    RUN/<stage>/DONE.json    written last, atomically: a stage without it is incomplete and is redone (resuming
                             what it saved: a training checkpoint, answers); it records the settings it ran with
    RUN/results.json         headline numbers (written by the report stage)
"""

from __future__ import annotations

import time
from pathlib import Path

from . import __version__
from .config import SELECTION_METHODS, Config
from .errors import NestuneError
from .io import read_json, write_json

FORMAT_VERSION = 1

# The config keys each stage's output depends on, its own and those of the stages it reads (a section name
# stands for all its keys). Keys that change only speed (batch sizes, the generation engine, sharding) are
# left out: resuming with another batch size is fine.
SPEED_ONLY = ("detect.batch_size", "eval.batch_size", "eval.generator", "train.fsdp")
PIPELINE_STAGES = ("detect", "cluster", "eval-before", "train", "fold", "eval-after")
# What `train.build_targets` reads: the prompts it picks and how it answers them (not the lr, the method ...).
TARGET_KEYS = ("detect.harmful", "detect.benign", "train.harmful", "train.benign", "train.n_harmful",
               "train.n_benign", "train.n_lookalike", "train.answer_tokens", "train.max_length",
               "train.prefill_fraction", "train.benign_framed")


def target_keys(cfg: Config) -> list[str]:
    """TARGET_KEYS, and the over-refusal set when training reads safe look-alikes from its train part."""
    return list(TARGET_KEYS) + (["eval.overrefusal"] if cfg.train.n_lookalike else [])


def upstream_stage(cfg: Config, stage: str) -> str | None:
    """The stage whose output `stage` reads (the baselines train without detection and clustering)."""
    if stage == "train":
        return "cluster" if cfg.train.method in SELECTION_METHODS else None
    return {"cluster": "detect", "fold": "train", "eval-after": "fold"}.get(stage)


def stage_parts(cfg: Config, stage: str) -> list[str]:
    """The config sections (or single keys) `stage` depends on: its own and, in turn, its upstream stage's."""
    up = upstream_stage(cfg, stage)  # None for the baselines' training: they read no detection
    # train-targets: a comparison's shared training targets (prompts and the base model's answers)
    # fold.drop_clusters reads the over-refusal set's safe look-alikes (src/nestune/attribution.py)
    fold = ["fold"] + (["eval.overrefusal"] if cfg.fold.drop_clusters else [])
    # so does train.protect (src/nestune/protect.py)
    train = target_keys(cfg) + ["train"] + (["eval.overrefusal"] if cfg.train.protect else [])
    own = {"detect": ["detect"], "cluster": ["cluster"], "train": train, "fold": fold,
           "train-targets": target_keys(cfg)}
    # an evaluation reads its benign next-token (KL) prompts from detect.benign's held-out part
    return (stage_parts(cfg, up) if up else []) + own.get(stage, ["eval", "detect.benign"])


def stage_settings(cfg: Config, stage: str) -> dict:
    """{dotted key: value} of the settings that decide what `stage` computes, for its DONE.json."""
    values = cfg.to_dict()
    settings = {"model": cfg.model, "seed": cfg.seed, "dtype": cfg.dtype}
    for part in stage_parts(cfg, stage):
        section, _, key = part.partition(".")
        keys = [key] if key else list(values[section])
        settings.update({f"{section}.{k}": values[section][k] for k in keys if f"{section}.{k}" not in SPEED_ONLY})
    if stage.startswith("eval"):
        from .models import dtype_name, evaluation_dtype

        # with dtype auto, what the machine decides (models.evaluation_dtype): answers of another dtype are
        # another model's, so a run moved to a machine that evaluates in another one does not mix them
        settings["eval_dtype"] = dtype_name(evaluation_dtype(cfg.dtype, cfg.device))
    return settings


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config: Config | None = None  # set by save_config; finished stages record their settings from it
        if self.path.exists() and not self.path.is_dir():
            raise NestuneError(f"run folder '{self.path}' is a file, not a folder",
                               "pass a new or existing folder as --out")

    def stage(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str) -> bool:
        return (self.path / name / "DONE.json").exists()

    def recorded_settings(self, name: str) -> dict:
        """The settings `name` ran with: its own from the current config, those of the stage it read from that
        stage's DONE.json (so `nestune cluster` after `nestune detect --z-threshold 2.5` records 2.5)."""
        settings = stage_settings(self.config, name)
        up = upstream_stage(self.config, name)
        if up and self.done(up):
            before = read_json(self.path / up / "DONE.json").get("settings") or {}
            settings.update({k: v for k, v in before.items() if k in settings})
        return settings

    def mark_done(self, name: str, info: dict | None = None) -> None:
        settings = {"settings": self.recorded_settings(name)} if self.config is not None else {}
        write_json(self.stage(name) / "DONE.json",
                   {"stage": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "nestune": __version__,
                    "format": FORMAT_VERSION, **(info or {}), **settings})

    def require(self, name: str, hint: str) -> Path:
        if not self.done(name):
            raise NestuneError(f"run folder '{self.path}' has no completed '{name}' stage", hint)
        return self.path / name

    def save_config(self, cfg: Config) -> None:
        """Save the resolved config; refuse a folder that holds another model's run."""
        self.check_compatible(cfg)
        write_json(self.path / "config.json", {"nestune": __version__, "format": FORMAT_VERSION, **cfg.to_dict()})
        self.config = cfg

    def saved_config(self) -> dict | None:
        f = self.path / "config.json"
        if not f.exists():
            return None
        try:
            saved = read_json(f)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise NestuneError(f"'{f}' is corrupt ({e})",
                               "delete it (the next command writes it again) or use a new --out folder") from None
        if not isinstance(saved, dict):
            raise NestuneError(f"'{f}' is not a nestune run config", "delete it or use a new --out folder")
        return saved

    def require_run(self) -> None:
        """Refuse a folder that holds no nestune run (e.g. a mistyped --out for `nestune report`)."""
        if not self.path.is_dir() or self.saved_config() is None:
            raise NestuneError(f"'{self.path}' is not a nestune run folder (no config.json)",
                               "pass the --out folder of a run started with `nestune run` or `nestune detect`")

    def check_compatible(self, cfg: Config) -> None:
        saved = self.saved_config()
        if not saved:
            return
        if saved.get("format") != FORMAT_VERSION:
            raise NestuneError(
                f"run folder '{self.path}' was written by an incompatible nestune (format {saved.get('format')})",
                "use a new --out folder",
            )
        started = any((d / "DONE.json").exists() for d in self.path.iterdir() if d.is_dir())
        if saved.get("model") != cfg.model and started:
            raise NestuneError(
                f"run folder '{self.path}' holds a run of model '{saved.get('model')}', not '{cfg.model}'",
                "use a new --out folder, or pass the same --model to resume",
            )

    def mark_started(self, name: str) -> None:
        """Record the settings a stage starts with, so that its unfinished work (a training checkpoint, cached
        targets, saved answers) is never resumed under other settings."""
        if self.config is not None:
            write_json(self.stage(name) / "STARTED.json", {"settings": stage_settings(self.config, name)})

    def check_resumable(self, cfg: Config, stages=PIPELINE_STAGES) -> None:
        """Refuse to resume a stage, finished or not, that ran with other settings than `cfg` asks for.

        Otherwise a rerun with a changed setting would skip finished stages and report their old results under
        the new config.json, or continue an unfinished one from work done under the old settings. Only keys that
        both sides have are compared (a DONE.json from an older nestune records fewer or none).
        """
        stale = []
        for name in stages:
            done, started = self.path / name / "DONE.json", self.path / name / "STARTED.json"
            record = done if done.exists() else started if started.exists() else None
            if record is None:
                continue
            recorded = read_json(record).get("settings") or {}
            now = stage_settings(cfg, name)
            changed = [(k, recorded[k], now[k]) for k in now if k in recorded and recorded[k] != now[k]]
            if record is started and name.startswith("eval"):
                # An unfinished evaluation's saved answers are kept per what they were generated with (prompt,
                # token budget, judge), so they serve other evaluation settings of the same model.
                changed = [c for c in changed if not c[0].startswith("eval.")]
            if changed:
                stale.append((name, record is done, changed))
        if not stale:
            return
        name, finished, changed = stale[0]
        shown = ", ".join(f"{k}={old!r} (now {new!r})" for k, old, new in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        # A finished evaluation whose own settings alone changed reuses its saved answers once its DONE.json is
        # gone; one of another model (other training, dtype or seed) and the other stages start over.
        redo = [str(self.path / n / "DONE.json")
                if n.startswith("eval") and all(k.startswith("eval.") for k, _, _ in c) else str(self.path / n)
                for n, _, c in stale]
        state = "finished" if finished else "holds unfinished work"
        raise NestuneError(
            f"'{self.path / name}' {state} with other settings: {shown}{more}",
            f"pass the same settings to resume, or use a new --out folder; to redo it here, delete {' and '.join(redo)}",
        )
