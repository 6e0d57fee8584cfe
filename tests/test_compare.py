"""`nestune compare` on a tiny model: shared stages, one run folder per method, resumable, tables and plot.

The fast test replaces evaluation with a stub (pipeline.evaluate_stage) and writes the shared detect/cluster
and training targets by hand, so it exercises the comparison itself: copies, fresh models, training budget,
folding, evaluation of the folded checkpoint, compare.json/.md/_plot.png/report.html and resuming.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from nestune import compare, models, pipeline
from nestune.compare import METHODS, parse_methods, rate_of, run_compare
from nestune.config import Config
from nestune.errors import NestuneError
from nestune.io import write_json
from nestune.models import ffn_targets
from nestune.runfolder import RunFolder
from nestune.testing import save_tiny, tiny_model


def target_rows() -> list[dict]:
    rows = [{"kind": "harmful", "prompt": f"how do I do harmful thing {i}", "response": "I can't help with that.",
             "own_refusal": i == 0, "original": f"Sure, step {i}"} for i in range(4)]
    return rows + [{"kind": "benign", "prompt": f"what is {i} plus one?", "response": f"It is {i + 1}."}
                   for i in range(4)]


def stub_evaluation(calls: list):
    """An evaluate_stage that records what it was given and writes a metrics.json in the evaluate format."""

    def evaluate_stage(cfg, run, stage, loaded):
        calls.append((str(run.path), stage, loaded.path))
        asr = 0.5 if stage == "eval-before" else 0.1 + 0.05 * len(calls) % 0.4
        metrics = {
            "asr_mean": {"rate": asr, "ci": [asr - 0.1, asr + 0.1], "n": 4},
            "asr_by_attack": {"none": {"rate": asr, "ci": [0, 1], "n": 4}, "prefill": {"rate": asr, "ci": [0, 1],
                                                                                      "n": 4}},
            "asr_any_attack": {"rate": asr, "ci": [0, 1], "n": 4},
            "overrefusal": {"rate": 0.25, "ci": [0, 0.5], "n": 4},
            "utility": {"arc-easy": {"acc": 0.3, "ci": [0.1, 0.5], "n": 8}},
            "judge": "refusal-markers",
        }
        write_json(run.stage(stage) / "metrics.json", metrics)
        run.mark_done(stage)
        return metrics

    return evaluate_stage


def prepare(tmp_path):
    """A tiny model folder, and a comparison folder with detect, cluster and training targets already done."""
    model_dir = save_tiny(tmp_path / "model")
    out = RunFolder(tmp_path / "cmp")
    out.mark_done("detect")
    targets = {}
    for i, t in enumerate(ffn_targets(tiny_model())):
        rows = [(7 * j + i) % t.n_neurons for j in range(4)]
        targets[t.name] = {"rows": rows, "clusters": [j % 2 for j in range(4)], "k": 2}
    write_json(out.stage("cluster") / "clusters.json", {"targets": targets})
    out.mark_done("cluster")
    t_run = RunFolder(out.path / "train-targets")
    (t_run.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target_rows()))
    cfg = Config(model=str(model_dir), device="cpu")
    cfg.train.batch_size = 4
    cfg.train.max_steps = 2
    return cfg, out


def test_parse_methods():
    assert parse_methods("nest, lora,nest") == ["nest", "lora"]
    with pytest.raises(NestuneError):
        parse_methods("nest,qlora")
    with pytest.raises(NestuneError):
        parse_methods("")


def test_rate_of_reads_both_shapes():
    assert rate_of({"rate": 0.25, "ci": [0, 1]}) == 0.25
    assert rate_of({"acc": 0.5}) == 0.5
    assert rate_of(0.1) == 0.1
    assert rate_of(None) is None and rate_of({}) is None


def test_compare_all_methods_end_to_end_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "evaluate_stage", stub_evaluation(calls))
    cfg, out = prepare(tmp_path)
    result = run_compare(cfg, list(METHODS), out.path)

    # one evaluation of the base in DIR, one of each folded model from its own fold folder
    assert calls[0] == (str(out.path), "eval-before", str(cfg.model))
    after = {c[0]: c for c in calls[1:]}
    assert len(calls) == 1 + len(METHODS)
    for m in METHODS:
        run_path = out.path / "methods" / m
        assert after[str(run_path)][2] == str(run_path / "fold" / "model")
        assert (run_path / "train" / "targets.jsonl").read_text() == (
            out.path / "train-targets" / "train" / "targets.jsonl").read_text()
        assert RunFolder(run_path).done("eval-before")  # the shared base evaluation, copied
        assert RunFolder(run_path).done("cluster") == (m in compare.SELECTION_METHODS)
        assert json.loads((run_path / "config.json").read_text())["train"]["method"] == m

    rows = result["methods"]
    assert list(rows) == list(METHODS)
    assert result["same_examples_seen"] and {r["examples_seen"] for r in rows.values()} == {8}
    assert rows["nest"]["trainable_params"] == 4 * 2 * 32  # 4 targets x k=2 x d_model
    assert rows["neurons"]["trainable_params"] == 4 * 4 * 32
    assert rows["random"]["trainable_params"] == rows["nest"]["trainable_params"]
    assert rows["lora"]["trainable_params"] == 8192
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in tiny_model().parameters())
    assert result["base"]["asr_mean"]["rate"] == 0.5 and result["judge"] == "refusal-markers"
    for r in rows.values():
        assert rate_of(r["asr_mean"]) is not None and r["wall_s"] is not None

    saved = json.loads((out.path / "compare.json").read_text())
    assert set(saved["methods"]) == set(METHODS) and "budget" in saved
    md = (out.path / "compare.md").read_text()
    assert all(f"| {m} |" in md for m in ("base", *METHODS))
    assert "ASR per attack" in md or "per attack" in md
    assert (out.path / "compare_plot.png").read_bytes()[:4] == b"\x89PNG"
    page = (out.path / "report.html").read_text()
    assert "data:image/png;base64," in page and "circuit-breakers" in page

    # Rerun: every stage is complete, so nothing trains or evaluates again.
    monkeypatch.setattr("nestune.train.run_train", lambda *a, **k: pytest.fail("train ran again"))
    run_compare(cfg, list(METHODS), out.path)
    assert len(calls) == 1 + len(METHODS)


def test_compare_resumes_a_half_done_method(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "evaluate_stage", stub_evaluation(calls))
    cfg, out = prepare(tmp_path)
    run_compare(cfg, ["nest"], out.path)
    method = RunFolder(out.path / "methods" / "nest")
    for stage in ("fold", "eval-after"):
        (method.path / stage / "DONE.json").unlink()
    run_compare(cfg, ["nest"], out.path)  # fold loads the base model itself, as train is done
    assert [c[1] for c in calls] == ["eval-before", "eval-after", "eval-after"]
    assert (method.path / "fold" / "model" / "model.safetensors").exists()



@pytest.mark.parametrize("command", ["run", "compare"])
def test_evaluation_runs_in_bf16_where_the_cpu_computes_it_and_training_in_fp32(tmp_path, monkeypatch, command):
    """dtype auto on a CPU with native bf16: the evaluations get bf16 copies, training and folding the fp32 base."""
    monkeypatch.setattr(models, "native_bf16", lambda device: True)  # this machine's CPU may have it or not
    seen, stub = [], stub_evaluation([])

    def evaluate_stage(cfg, run, stage, loaded):
        seen.append((stage, loaded.model.dtype))
        return stub(cfg, run, stage, loaded)

    monkeypatch.setattr(pipeline, "evaluate_stage", evaluate_stage)
    cfg, out = prepare(tmp_path)
    if command == "run":
        cfg.out = str(out.path)
        (out.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target_rows()))
        pipeline.run_pipeline(cfg)
        trained = out
    else:
        run_compare(cfg, ["nest"], out.path)
        trained = RunFolder(out.path / "methods" / "nest")
    assert seen == [("eval-before", torch.bfloat16), ("eval-after", torch.bfloat16)]
    folded = load_file(str(trained.path / "fold" / "model" / "model.safetensors"))
    assert {t.dtype for t in folded.values()} == {torch.float32}
    assert json.loads((trained.path / "eval-after" / "DONE.json").read_text())["settings"]["eval_dtype"] == "bfloat16"

    # Moved to a machine that evaluates in fp32, the run's answers are another dtype's: refused, not mixed.
    monkeypatch.setattr(models, "native_bf16", lambda device: False)
    with pytest.raises(NestuneError, match="eval_dtype='bfloat16' \\(now 'float32'\\)"):
        trained.check_resumable(cfg)
    cfg.dtype = "bf16"  # a dtype asked for is the one used everywhere
    assert pipeline.eval_dtype(cfg) == torch.bfloat16 and models.parse_dtype(cfg.dtype, "cpu") == torch.bfloat16

@pytest.mark.slow
def test_compare_with_the_real_stages_on_a_tiny_model(tmp_path):
    """Real detect, cluster, target generation and evaluation; needs the bundled data sets in the cache."""
    from nestune.config import load_config

    cfg = load_config(preset="smoke", overrides={
        "model": str(save_tiny(tmp_path / "model")), "device": "cpu", "detect.z_threshold": 1.0,
        "detect.n_prompts": 16, "train.n_harmful": 4, "train.n_benign": 4, "train.answer_tokens": 8,
        "eval.attacks": "none,prefill", "eval.n_behaviours": 3, "eval.max_new_tokens": 8, "eval.n_overrefusal": 2,
        "eval.n_utility": 3, "eval.utility_tasks": "arc-easy", "eval.n_kl": 2, "eval.bootstrap": 50})
    try:
        from nestune import data
        from nestune.evaluate.run import load_inputs

        data.pick(cfg.detect.harmful, "detect", 1)
        load_inputs(cfg)
    except Exception as e:  # no cached data sets and no network: nothing to evaluate on
        pytest.skip(f"bundled data sets unavailable: {str(e).splitlines()[0][:120]}")
    result = run_compare(cfg, ["nest", "lora"], tmp_path / "cmp")
    assert rate_of(result["base"]["asr_mean"]) is not None
    for m in ("nest", "lora"):
        assert rate_of(result["methods"][m]["asr_mean"]) is not None
        assert result["methods"][m]["trainable_params"] > 0
        change = result["methods"][m]["change"]  # paired with the base on the same behaviours
        assert change["asr_mean"]["n"] == 3 and change["overrefusal"]["n"] == 2
        assert change["asr_mean"]["change"] == pytest.approx(
            rate_of(result["methods"][m]["asr_mean"]) - rate_of(result["base"]["asr_mean"]))
    assert "## Change from the base" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare_plot.png").exists()


def test_shared_targets_are_not_reused_under_other_training_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "evaluate_stage", stub_evaluation([]))
    cfg, out = prepare(tmp_path)
    run_compare(cfg, ["nest"], out.path)
    recorded = json.loads((out.path / "train-targets" / "DONE.json").read_text())["settings"]
    assert recorded["train.n_harmful"] == cfg.train.n_harmful and "train.lr" not in recorded

    # Another method with another lr reuses the targets: they do not depend on it.
    cfg.train.lr = 1e-3
    run_compare(cfg, ["lora"], out.path)
    assert RunFolder(out.path / "methods" / "lora").done("eval-after")

    # Other training sizes would need other targets: refused before anything runs, naming the folder to delete.
    cfg.train.n_harmful += 1
    before = (out.path / "config.json").read_text()
    with pytest.raises(NestuneError) as err:
        run_compare(cfg, ["full"], out.path)
    assert "train-targets" in str(err.value) and "train.n_harmful" in str(err.value)
    assert not (out.path / "methods" / "full").exists()
    assert (out.path / "config.json").read_text() == before


def test_check_rows_hold_each_method_to_the_shipping_targets():
    base = {"method": "base", "asr_mean": {"rate": 0.5, "ci": [0.4, 0.6], "n": 24}}
    change = {"asr_mean": {"change": -0.48, "ci": [-0.5, -0.46], "n": 24},  # cut 96% [92, 100]
              "overrefusal": {"change": 0.05, "ci": [-0.05, 0.15], "n": 40}}
    result = {"base": base, "methods": {"nest": {"method": "nest", "change": change},
                                        "old": {"method": "old", "change": None}}}  # no per-item outcomes
    header, body = compare.check_rows(result)
    assert header == ["method", "attack success cut (mean over attacks)", "over-refusal rise"]
    assert body == [["nest", "96.0% [92.0, 100.0]: met", "+5.0 [-5.0, +15.0]: met?"]]
    assert "## Checks before shipping" in compare.render_markdown(
        {**result, "model": "m", "judge": "j", "budget": {}, "same_examples_seen": True, "notes": []})


def test_plot_draws_without_over_refusal_and_skips_an_empty_comparison(tmp_path):
    row = {"method": "nest", "trainable_params": 100, "asr_mean": {"rate": 0.1, "ci": [0.05, 0.2], "n": 24},
           "overrefusal": {"rate": 0.3, "ci": [0.2, 0.4], "n": 40}}
    full = {"model": "tiny", "judge": "refusal", "methods": {"nest": row},
            "base": {"asr_mean": {"rate": 0.6, "ci": [0.5, 0.7], "n": 24}, "overrefusal": {"rate": 0.2, "n": 40}}}
    assert compare.plot_compare(full, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    # An evaluation without the over-refusal set still gets the left panel
    bare = {**full, "methods": {"nest": {**row, "overrefusal": None}}, "base": {"asr_mean": full["base"]["asr_mean"]}}
    assert compare.plot_compare(bare, tmp_path / "b.png")
    empty = {**full, "methods": {}, "base": {}}
    assert not compare.plot_compare(empty, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
