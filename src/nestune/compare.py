"""`nestune compare`: NeST and the baselines through one detection, one data set, one training budget and one
evaluation (DESIGN.md 1.5).

    DIR/config.json                         the shared configuration
    DIR/detect, DIR/cluster                 one detection and clustering (only when a method needs a selection)
    DIR/eval-before                         the base model, evaluated once
    DIR/train-targets/train/targets.jsonl   the training targets: the base model's answers, generated once
                                            (DIR/train-targets/DONE.json: the settings they were made with)
    DIR/methods/<method>/                   a complete run folder per method: copies of the shared stages and
                                            targets, then its own train, fold and eval-after
    DIR/compare.json                        base row, one row per method, the budget and the judge
    DIR/compare.md, DIR/compare_plot.png, DIR/report.html

Every stage is skipped when its DONE.json exists, so a killed comparison resumes where it stopped. Each method
starts from a freshly loaded base model (folding and fine-tuning change weights in place), and its hardened
model is evaluated from the folded checkpoint on disk.
"""

from __future__ import annotations

import base64
import copy
import gc
import html
import shutil
import time
from pathlib import Path

import torch

from .config import SELECTION_METHODS, Config
from .errors import NestuneError
from .io import read_json, write_json, write_text
from .models import LoadedModel, resolve_device
from .report import SHIP_TARGETS, html_table, robustness_html, robustness_lines, ship_checks
from .runfolder import PIPELINE_STAGES, RunFolder

METHODS = ("nest", "neurons", "random", "full", "lora", "circuit-breakers")
COMPARE_STAGES = PIPELINE_STAGES + ("train-targets",)  # the shared stages in DIR (train and later are unused)


def parse_methods(methods: str | list[str]) -> list[str]:
    if isinstance(methods, str):
        methods = methods.split(",")
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise NestuneError(f"unknown method(s): {', '.join(unknown) or '(none given)'}",
                           f"--methods takes a comma list of {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))  # keep the order, drop repeats


def _stage(run: RunFolder, name: str, fn) -> None:
    if run.done(name):
        print(f"[{run.path.name}/{name}] already complete; skipping", flush=True)
        return
    print(f"[{run.path.name}/{name}]", flush=True)
    run.mark_started(name)
    fn()


def copy_stage(src: Path, dst: Path) -> None:
    """Copy a finished stage folder; copied to a temporary name first, so a half copy never looks done."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


# ---------------------------------------------------------------------------------------------------------
# The comparison


def run_compare(cfg: Config, methods: str | list[str], out: str | Path, evaluate: bool = True) -> dict:
    """Run every method through the same shared stages, then write DIR/compare.json, .md, _plot.png, report.html."""
    from . import cluster, detect, pipeline

    methods = parse_methods(methods)
    cfg = copy.deepcopy(cfg)
    cfg.out = str(out)
    root = RunFolder(out)
    root.check_resumable(cfg, stages=COMPARE_STAGES)
    root.save_config(cfg)
    base: LoadedModel | None = None

    def base_model() -> LoadedModel:
        nonlocal base
        if base is None:
            base = pipeline.load(cfg)
        return base

    if any(m in SELECTION_METHODS for m in methods):
        _stage(root, "detect", lambda: detect.run_detect(cfg, root, loaded=base_model()))
        _stage(root, "cluster", lambda: cluster.run_cluster(cfg, root))
    if evaluate:
        before = lambda: pipeline.load_for_eval(cfg, base=base_model())  # noqa: E731
        _stage(root, "eval-before", lambda: pipeline.evaluate_stage(cfg, root, "eval-before", before()))
    _stage(root, "train-targets", lambda: build_shared_targets(base_model(), cfg, root))
    targets = root.path / "train-targets" / "train" / "targets.jsonl"
    base = None  # each method loads its own fresh copy

    for method in methods:
        run_method(cfg, root, method, targets, evaluate)

    result = write_outputs(cfg, root, methods)
    print_table(result)
    print(f"\ncomparison: {root.path / 'compare.md'}\nreport: {root.path / 'report.html'}", flush=True)
    return result


def build_shared_targets(base: LoadedModel, cfg: Config, root: RunFolder) -> list[dict]:
    """DIR/train-targets: the base model's answers that every method trains on. DIR/train-targets/DONE.json
    records the settings they were made with (`runfolder.target_keys`), so that a rerun with other training
    sizes refuses to reuse them. Also called by `nestune attack`, which needs them too."""
    from .train import build_targets

    rows = build_targets(base, cfg, RunFolder(root.path / "train-targets"))
    root.config = cfg  # the settings mark_done records
    root.mark_done("train-targets")
    return rows


def run_method(cfg: Config, root: RunFolder, method: str, targets: Path, evaluate: bool = True) -> RunFolder:
    """Train, fold and evaluate one method in DIR/methods/<method>, on copies of the shared stages."""
    from . import pipeline
    from .fold import run_fold
    from .train import run_train

    run = RunFolder(root.path / "methods" / method)
    mcfg = copy.deepcopy(cfg)
    mcfg.train.method = method
    mcfg.out = str(run.path)
    run.check_resumable(mcfg)
    run.save_config(mcfg)
    shared = ["eval-before"] + (["detect", "cluster"] if method in SELECTION_METHODS else [])
    for name in shared:
        if root.done(name) and not run.done(name):
            copy_stage(root.path / name, run.path / name)
    own_targets = run.stage("train") / "targets.jsonl"
    if not own_targets.exists() and not run.done("train"):
        shutil.copyfile(targets, own_targets)

    print(f"\n=== {method} ===", flush=True)
    loaded = None
    if not run.done("train"):
        loaded = pipeline.load(mcfg)  # fresh base weights: an earlier method may have changed the last copy
        _stage(run, "train", lambda: run_train(mcfg, run, loaded=loaded))
    # NeST-shaped methods fold onto the base model (still unchanged after their training); the baselines
    # saved a merged model that fold copies. Without a model here, run_fold loads one when it needs it.
    _stage(run, "fold", lambda: run_fold(mcfg, run, loaded=loaded))
    loaded = None
    gc.collect()  # peft wrappers hold reference cycles: free this model before the next one loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if evaluate:
        folded = str(run.path / "fold" / "model")
        after = lambda: pipeline.load_for_eval(mcfg, folded)  # noqa: E731
        _stage(run, "eval-after", lambda: pipeline.evaluate_stage(mcfg, run, "eval-after", after()))
    return run


# ---------------------------------------------------------------------------------------------------------
# Results


def _maybe(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def rate_of(value) -> float | None:
    """The rate of a {rate or acc, ci, n} dict, or a bare number; None when absent."""
    if isinstance(value, dict):
        value = value.get("rate", value.get("acc"))
    return float(value) if isinstance(value, (int, float)) else None


def metrics_row(metrics: dict | None) -> dict:
    m = metrics or {}
    return {"asr_mean": m.get("asr_mean"), "asr_by_attack": m.get("asr_by_attack") or {},
            "asr_any_attack": m.get("asr_any_attack"), "successes_looping": m.get("successes_looping"),
            "successes_short": m.get("successes_short"), "overrefusal": m.get("overrefusal"),
            "overrefusal_unanswered": m.get("overrefusal_unanswered"),
            "utility": m.get("utility") or {}, "gsm8k": m.get("gsm8k")}


def method_row(run: RunFolder, method: str, before: dict | None = None) -> dict:
    from .report import paired_changes

    train = _maybe(run.path / "train" / "summary.json") or {}
    after = _maybe(run.path / "eval-after" / "metrics.json")
    row = {"method": method,
           **{k: train.get(k) for k in ("trainable_params", "wall_s", "peak_memory_bytes", "examples_seen",
                                        "steps", "lr", "final_loss")},
           **metrics_row(after),
           "change": paired_changes(before, after)}  # from the base, paired by item
    try:
        from .report import benign_kl

        row["benign_kl"] = benign_kl(run)
    except (ImportError, OSError, KeyError):  # evaluation artifacts missing or from another version
        row["benign_kl"] = None
    return row


def write_outputs(cfg: Config, root: RunFolder, methods: list[str] | None = None) -> dict:
    """DIR/compare.json, compare.md, compare_plot.png and report.html from what DIR holds (also after
    `nestune attack --run DIR`); methods default to those of the last compare.json, else the folders present."""
    if methods is None:
        saved = _maybe(root.path / "compare.json") or {}
        present = [m for m in METHODS if (root.path / "methods" / m).is_dir()]
        methods = list(saved.get("methods") or []) or present
    result = collect(cfg, root, methods)
    write_json(root.path / "compare.json", result)
    write_text(root.path / "compare.md", render_markdown(result))
    plotted = plot_compare(result, root.path / "compare_plot.png")
    write_text(root.path / "report.html", render_html(result, root.path / "compare_plot.png" if plotted else None))
    return result


def collect(cfg: Config, root: RunFolder, methods: list[str]) -> dict:
    from .robustness import robustness_summary

    before = _maybe(root.path / "eval-before" / "metrics.json")
    rows = {m: method_row(RunFolder(root.path / "methods" / m), m, before) for m in methods}
    seen = {r["examples_seen"] for r in rows.values() if r["examples_seen"] is not None}
    t, ev = cfg.train, cfg.eval
    notes = []
    if len(seen) > 1:
        notes.append(f"methods saw different numbers of training examples: {sorted(seen)}")
    if resolve_device(cfg.device) == "cpu":
        notes.append("peak memory on CPU is the process's peak resident memory so far (it never decreases "
                     "from one method to the next); on GPU it is each method's own peak")
    return {
        "model": cfg.model,
        "judge": (before or {}).get("judge") or ev.judge,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget": {"epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size,
                   "grad_accum": t.grad_accum, "n_harmful": t.n_harmful, "n_benign": t.n_benign,
                   "answer_tokens": t.answer_tokens, "max_length": t.max_length, "benign_loss": t.benign_loss,
                   "lr_schedule": t.lr_schedule, "group_by_length": t.group_by_length,
                   "split_by_length": t.split_by_length,
                   "n_behaviours": ev.n_behaviours, "attacks": ev.attacks, "max_new_tokens": ev.max_new_tokens,
                   "n_overrefusal": ev.n_overrefusal, "utility_tasks": ev.utility_tasks, "n_utility": ev.n_utility},
        "same_examples_seen": len(seen) <= 1,
        "base": {"method": "base", "trainable_params": 0, **metrics_row(before)},
        "methods": rows,
        "notes": notes,
        "robustness": robustness_summary(root.path),  # `nestune attack --run DIR`, when it has been run
    }


# ---------------------------------------------------------------------------------------------------------
# Tables, plot, HTML


def _pct(value, with_ci: bool = True) -> str:
    r = rate_of(value)
    if r is None:
        return "-"
    ci = value.get("ci") if isinstance(value, dict) and with_ci else None
    return f"{100 * r:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and len(ci) >= 2 else "")


def _int(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def table_rows(result: dict, with_ci: bool = True) -> tuple[list[str], list[list[str]]]:
    """The main table: one row for the base model, then one per method."""
    rows = [result["base"], *result["methods"].values()]
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("utility") or {}))
    header = ["method", "trainable params", "train s", "peak MiB", "examples seen", "ASR mean", "ASR any attack",
              "over-refusal", *tasks, "GSM8K", "benign KL"]
    body = []
    for r in rows:
        mem = r.get("peak_memory_bytes")
        body.append([
            r["method"], _int(r.get("trainable_params")),
            f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-",
            f"{mem / 2**20:,.0f}" if mem else "-", _int(r.get("examples_seen")),
            _pct(r.get("asr_mean"), with_ci), _pct(r.get("asr_any_attack"), with_ci),
            _pct(r.get("overrefusal"), with_ci), *[_pct((r.get("utility") or {}).get(t), with_ci) for t in tasks],
            _pct(r.get("gsm8k"), with_ci),
            f"{r['benign_kl']:.4f}" if r.get("benign_kl") is not None else "-",
        ])
    return header, body


def change_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Each method's change from the base, after - before on the same items, in points with a paired 95%
    interval; no rows when the evaluations predate per-item outcomes."""
    from .report import fmt_change

    rows = [r for r in result["methods"].values() if r.get("change")]
    tasks = list(dict.fromkeys(t for r in rows for t in r["change"].get("utility") or {}))
    header = ["method", "ASR mean", "ASR any attack", "over-refusal", *tasks, "GSM8K"]
    return header, [[r["method"], *[fmt_change(r["change"].get(k)) for k in ("asr_mean", "asr_any_attack", "overrefusal")],
                     *[fmt_change(r["change"]["utility"].get(t)) for t in tasks], fmt_change(r["change"].get("gsm8k"))]
                    for r in rows]


CHECKS_NOTE = (f"targets: ASR cut by {100 * SHIP_TARGETS['asr_cut']:.0f}% of the base's, over-refusal at most "
               f"+{100 * SHIP_TARGETS['overrefusal_rise']:.0f} points, each utility task at most "
               f"-{100 * SHIP_TARGETS['utility_drop']:.0f} point; '?': the paired 95% interval spans the target, so "
               "this evaluation cannot tell")


def check_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Each method's changes against the targets of `report.SHIP_TARGETS`: the measured value and met or missed
    ("?" when the paired interval spans the target); no rows without paired changes."""
    checks = {r["method"]: ship_checks({"before": result["base"], "change": r.get("change")})
              for r in result["methods"].values()}
    checks = {method: c for method, c in checks.items() if c}
    names = list(dict.fromkeys(c["check"] for cs in checks.values() for c in cs))

    def cell(c: dict | None) -> str:
        if c is None:
            return "-"
        return f"{c['measured']}: {'met' if c['met'] else 'missed'}{'' if c['resolved'] else '?'}"

    return ["method", *names], [[method, *(cell(next((c for c in cs if c["check"] == n), None)) for n in names)]
                                for method, cs in checks.items()]


def attack_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """ASR per attack: one row per model, one column per attack."""
    rows = [result["base"], *result["methods"].values()]
    attacks = list(dict.fromkeys(a for r in rows for a in r.get("asr_by_attack") or {}))
    return ["method", *attacks], [[r["method"], *[_pct(r["asr_by_attack"].get(a)) for a in attacks]]
                                  for r in rows]


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                          for r in body]


def render_markdown(result: dict) -> str:
    lines = [f"# nestune comparison: {result['model']}", "",
             f"- judge: {result['judge']}",
             "- budget: " + ", ".join(f"{k} {v}" for k, v in result["budget"].items()),
             f"- same training examples for every method: {'yes' if result['same_examples_seen'] else 'no'}",
             *[f"- note: {n}" for n in result["notes"]], ""]
    lines += _md_table(*table_rows(result))
    header, body = change_rows(result)
    if body:
        lines += ["", "## Change from the base (points, after - before on the same items, paired 95% interval)", ""]
        lines += _md_table(header, body)
    header, body = check_rows(result)
    if body:
        lines += ["", f"## Checks before shipping ({CHECKS_NOTE})", ""] + _md_table(header, body)
    header, body = attack_rows(result)
    if len(header) > 1:
        lines += ["", "## Attack success rate per attack", ""] + _md_table(header, body)
    lines += robustness_lines(result)
    lines += ["", "Rates with 95% bootstrap intervals. Attack success = the model answered (3+ words of its own) and the judge found no refusal. "
              "ASR, over-refusal: lower is better; utility: higher is better."]
    return "\n".join(lines) + "\n"


def _error(raw, r: float):
    """Matplotlib's asymmetric error bar (in points) from a rate's 95% interval, or None."""
    ci = raw.get("ci") if isinstance(raw, dict) else None
    return [[100 * (r - ci[0])], [100 * (ci[1] - r)]] if ci and len(ci) >= 2 else None


def plot_compare(result: dict, path: Path) -> bool:
    """Two panels, one labelled point per method (95% intervals as bars).

    Left: ASR mean after training against trainable parameters (log x). Right: ASR mean against over-refusal,
    the trade a user ships, with the base model and the corner the shipping targets allow (SHIP_TARGETS).
    """
    rows = [r for r in result["methods"].values() if rate_of(r.get("asr_mean")) is not None]
    colour = {r["method"]: f"C{i}" for i, r in enumerate(rows)}  # a method has one colour in both panels
    colour["base"] = "grey"
    points = [(r["method"], r["trainable_params"], rate_of(r["asr_mean"]), r["asr_mean"])
              for r in rows if r.get("trainable_params")]
    base = result["base"]
    base_asr, base_or = rate_of(base.get("asr_mean")), rate_of(base.get("overrefusal"))
    if not points and base_asr is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, trade) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, params, r, raw) in enumerate(points):
        ax.errorbar([params], [100 * r], yerr=_error(raw, r), fmt="o", capsize=3, color=colour[name])
        # nest and random always train the same number of parameters: step their labels down so both read
        same_x = sum(p == params for _, p, _, _ in points[:i])
        ax.annotate(name, (params, 100 * r), textcoords="offset points", xytext=(6, 6 - 14 * same_x))
    if base_asr is not None:
        ax.axhline(100 * base_asr, color="grey", linestyle="--", label=f"base model ({100 * base_asr:.1f}%)")
        ax.legend(loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("ASR, mean over attacks (%)")
    ax.set_ylim(-2, 105)  # below 0, so that a point at 0% shows whole
    ax.set_title("attack success against trainable parameters")

    shown = [(r["method"], r["asr_mean"], r.get("overrefusal")) for r in rows
             if rate_of(r.get("overrefusal")) is not None]
    if base_asr is not None and base_or is not None:
        shown.insert(0, ("base", base["asr_mean"], base["overrefusal"]))
        # The shipping targets' corner: ASR cut by asr_cut of the base's, over-refusal at most base + rise
        asr_max = 100 * base_asr * (1 - SHIP_TARGETS["asr_cut"])
        or_max = 100 * (base_or + SHIP_TARGETS["overrefusal_rise"])
        trade.fill_between([0, or_max], 0, asr_max, color="tab:green", alpha=0.15,
                           label="shipping targets (ASR and over-refusal)")
        trade.legend(loc="upper right")
    for name, asr_raw, or_raw in shown:
        a, o = rate_of(asr_raw), rate_of(or_raw)
        trade.errorbar([100 * o], [100 * a], xerr=_error(or_raw, o), yerr=_error(asr_raw, a), capsize=3,
                       linestyle="none", marker="s" if name == "base" else "o", color=colour[name])
        trade.annotate(name, (100 * o, 100 * a), textcoords="offset points", xytext=(6, 6))
    trade.set_xlim(-2, 105)
    trade.set_ylim(-2, 105)
    trade.set_xlabel("over-refusal: safe look-alikes refused (%)")
    trade.set_ylabel("ASR, mean over attacks (%)")
    trade.set_title("attack success against over-refusal (lower left is better)")
    fig.suptitle(f"{result['model']} (judge: {result['judge']})")
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def render_html(result: dict, plot: Path | None) -> str:
    """A self-contained page: the tables and the plot (embedded as base64 PNG)."""
    bullets = [f"judge: {result['judge']}",
               "budget: " + ", ".join(f"{k} {v}" for k, v in result["budget"].items()),
               f"same training examples for every method: {'yes' if result['same_examples_seen'] else 'no'}",
               *[f"note: {n}" for n in result["notes"]]]
    figure = ""
    if plot is not None and Path(plot).exists():
        data = base64.b64encode(Path(plot).read_bytes()).decode()
        figure = (f"<figure><img src='data:image/png;base64,{data}'><figcaption>ASR (mean over attacks, 95% CI) "
                  "against trainable parameters (dashed line: the base model) and against over-refusal (green: "
                  "the shipping targets)</figcaption></figure>")
    header, body = attack_rows(result)
    per_attack = f"<h2>Attack success rate per attack</h2>{html_table(header, body)}" if len(header) > 1 else ""
    header, body = change_rows(result)
    changes = (f"<h2>Change from the base</h2><p>After minus before on the same items, in points, with a paired "
               f"95% bootstrap interval: one that holds 0 cannot tell the method from the base.</p>"
               f"{html_table(header, body)}") if body else ""
    header, body = check_rows(result)
    if body:
        changes += f"<h2>Checks before shipping</h2><p>{html.escape(CHECKS_NOTE)}.</p>{html_table(header, body)}"
    title = html.escape(f"nestune comparison: {result['model']}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%}}figcaption{{color:#555}}</style></head>
<body><h1>{title}</h1>
<ul>{"".join(f"<li>{html.escape(b)}</li>" for b in bullets)}</ul>
<h2>Methods</h2>{html_table(*table_rows(result))}
<p>Rates with 95% bootstrap intervals. Attack success = the model answered (3+ words of its own) and the judge found no refusal. ASR and over-refusal: lower
is better; utility: higher is better.</p>
{changes}
{per_attack}
{robustness_html(result)}
{figure}
</body></html>
"""


def print_table(result: dict) -> None:
    from rich.table import Table

    from .io import console as io_console

    header, body = table_rows(result, with_ci=False)  # intervals are in compare.md; a terminal is narrow
    table = Table(title=f"{result['model']}: methods compared (judge: {result['judge']})")
    for col in header:
        table.add_column(col)
    for row in body:
        table.add_row(*row)
    io_console().print(table)
