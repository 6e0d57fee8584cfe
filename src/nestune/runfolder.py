"""The run folder: each stage reads the previous stage's artifacts and writes its own.

    RUN/config.json          resolved configuration of the latest invocation
    RUN/<stage>/...          artifacts of a stage (detect, cluster, train, fold, eval-before, eval-after, ...)
    RUN/<stage>/DONE.json    written last, atomically: a stage without it is incomplete and is redone
    RUN/results.json         headline numbers (written by the report stage)
"""

from __future__ import annotations

import time
from pathlib import Path

from . import __version__
from .config import Config
from .errors import NestuneError
from .io import read_json, write_json

FORMAT_VERSION = 1


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NestuneError(f"run folder '{self.path}' is a file, not a folder",
                               "pass a new or existing folder as --out")

    def stage(self, name: str) -> Path:
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str) -> bool:
        return (self.path / name / "DONE.json").exists()

    def mark_done(self, name: str, info: dict | None = None) -> None:
        write_json(self.stage(name) / "DONE.json",
                   {"stage": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "nestune": __version__,
                    "format": FORMAT_VERSION, **(info or {})})

    def require(self, name: str, hint: str) -> Path:
        if not self.done(name):
            raise NestuneError(f"run folder '{self.path}' has no completed '{name}' stage", hint)
        return self.path / name

    def save_config(self, cfg: Config) -> None:
        """Save the resolved config; refuse a folder that holds another model's run."""
        self.check_compatible(cfg)
        write_json(self.path / "config.json", {"nestune": __version__, "format": FORMAT_VERSION, **cfg.to_dict()})

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
