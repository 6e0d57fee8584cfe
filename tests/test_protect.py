"""train.protect: cluster updates kept out of the FFN-input directions that benign and safe look-alike prompts use."""

import json

import pytest
import torch

from nestune import data
from nestune.config import Config, load_config
from nestune.errors import NestuneError
from nestune.fold import model_card
from nestune.io import read_json, write_json
from nestune.models import LoadedModel, ffn_targets
from nestune.protect import free_directions, input_moments, project, protected_prompts, protection_bases
from nestune.report import collect_results, render_markdown
from nestune.runfolder import RunFolder, stage_settings
from nestune.testing import TINY_ARCHS, random_adapter, tiny_model, tiny_tokenizer
from nestune.train import run_train
from nestune.tuner import NeSTAdapter


def test_free_directions_leave_out_the_fewest_that_hold_all_but_eps_of_the_energy():
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    moment = rotation @ torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.1])) @ rotation.T
    # 100 + 10 of 111.1 is 99.0%: two directions hold all but 1%, three all but 0.1%
    for eps, kept in ((0.01, [2, 3]), (0.001, [3])):
        basis = free_directions(moment, eps)
        assert torch.allclose(basis @ basis.T, rotation[:, kept] @ rotation[:, kept].T, atol=1e-5)
    assert free_directions(moment, 1.0).shape == (4, 4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_projected_updates_are_quiet_on_the_protected_prompts(arch, tmp_path):
    loaded = LoadedModel(tiny_model(arch), tiny_tokenizer(), "tiny-test", "test", "tiny-test")
    adapter = random_adapter(loaded.model)
    cfg = Config(model="tiny-test", device="cpu")
    cfg.eval.overrefusal, cfg.train.protect = write_safe_prompts(tmp_path), 0.02
    rows = [{"kind": "benign", "prompt": f"what is {i} plus one?"} for i in range(4)]
    bases, info = protection_bases(cfg, loaded, adapter, rows)
    project(adapter, bases)
    moments, tokens = input_moments(loaded.model, loaded.tokenizer, protected_prompts(cfg, rows),
                                    [s.module_path for s in adapter.specs], 4, 256)
    assert tokens == info["protected_tokens"] > 0
    for spec in adapter.specs:
        moment = moments[spec.module_path]
        for delta in adapter.update_for(spec.name).delta.detach():
            assert float(delta @ moment @ delta) <= 0.02 * float(delta @ delta * moment.trace()) + 1e-6, spec.name


def test_a_protection_that_leaves_no_direction_is_refused(tmp_path):
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-test", "test", "tiny-test")
    cfg = Config(model="tiny-test", device="cpu")
    cfg.eval.overrefusal, cfg.train.protect = write_safe_prompts(tmp_path), 1e-12
    with pytest.raises(NestuneError, match="leaves no direction"):
        protection_bases(cfg, loaded, random_adapter(loaded.model), [{"kind": "benign", "prompt": "hi"}])


def write_safe_prompts(tmp_path) -> str:
    safe = tmp_path / "safe.txt"
    safe.write_text("".join(f"how do I kill a python process number {i}?\n" for i in range(30)))
    return str(safe)


def trained(tmp_path, protect: float) -> tuple[Config, RunFolder, LoadedModel]:
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-test", "test", "tiny-test")
    run = RunFolder(tmp_path / f"run-{protect}")
    rows = [{"kind": "harmful", "prompt": f"explain how to do harmful thing number {i}",
             "response": "I'm sorry, but I can't help with that.", "own_refusal": False} for i in range(6)]
    rows += [{"kind": "benign", "prompt": f"what is {i} plus one?", "response": f"{i} plus one is {i + 1}."}
             for i in range(6)]
    (run.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    targets = {t.name: {"rows": [3 * j + 1 for j in range(6)], "clusters": [j % 2 for j in range(6)], "k": 2}
               for t in ffn_targets(loaded.model)}
    write_json(run.stage("cluster") / "clusters.json", {"targets": targets})
    run.mark_done("cluster")
    cfg = Config(model="tiny-test", device="cpu")
    cfg.eval.overrefusal, cfg.train.protect = write_safe_prompts(tmp_path), protect
    cfg.train.batch_size, cfg.train.epochs, cfg.train.lr = 4, 3, 1.0
    run_train(cfg, run, loaded)
    return cfg, run, loaded


def quiet_on_protected(cfg, run, loaded) -> float:
    """The largest share of the protected tokens' input energy that a trained update vector, scaled to unit
    length, picks up: delta' M delta / (|delta|^2 trace M), M the sum of x x' over those tokens."""
    adapter, _ = NeSTAdapter.load(run.stage("train") / "adapter")
    rows = [json.loads(line) for line in (run.stage("train") / "targets.jsonl").read_text().splitlines()]
    paths = [s.module_path for s in adapter.specs]
    moments, _ = input_moments(loaded.model, loaded.tokenizer, protected_prompts(cfg, rows), paths, 4, 256)
    worst = 0.0
    for spec in adapter.specs:
        moment = moments[spec.module_path]
        for delta in adapter.update_for(spec.name).delta.detach():
            assert delta.norm() > 0, f"{spec.name}: nothing trained"
            worst = max(worst, float(delta @ moment @ delta / (delta @ delta * moment.trace())))
    return worst


def test_protected_updates_pick_up_at_most_eps_of_the_safe_prompts_inputs(tmp_path):
    eps = 0.01
    cfg, run, loaded = trained(tmp_path, eps)
    summary = read_json(run.stage("train") / "summary.json")
    lookalikes = sum(len(data.pick(cfg.eval.overrefusal, part, 0)) for part in ("detect", "train"))
    assert summary["protect"] == eps and summary["protected_prompts"] == 6 + lookalikes
    assert 0 < summary["free_directions"]["min"] < summary["free_directions"]["of"] == 32
    assert quiet_on_protected(cfg, run, loaded) <= eps
    # The report and the model card say what was protected.
    results = collect_results(run)
    assert results["training"]["protect"] == eps
    assert any(line.startswith("- train.protect=0.01: ") for line in render_markdown(results).splitlines())
    card = model_card(cfg, run, {"method": "nest", "trainable_parameters": 256})
    assert f"all but 0.01 of the energy of {summary['protected_prompts']} benign" in card
    # Without the protection the same training puts its updates where the safe prompts' inputs are.
    assert quiet_on_protected(*trained(tmp_path, 0.0)) > 5 * eps


def test_protect_is_refused_where_it_does_not_apply():
    for setting in ({"train.update_side": "output"}, {"train.method": "lora"}):
        with pytest.raises(NestuneError, match="train.protect"):
            load_config(overrides={"train.protect": "0.01", **setting}, environ={})
    with pytest.raises(NestuneError, match="between 0 and 1"):
        load_config(overrides={"train.protect": "2"}, environ={})


def test_the_over_refusal_set_is_a_training_setting_only_when_protecting():
    cfg = Config()
    assert "eval.overrefusal" not in stage_settings(cfg, "train")
    cfg.train.protect = 0.01
    assert stage_settings(cfg, "train")["eval.overrefusal"] == cfg.eval.overrefusal
