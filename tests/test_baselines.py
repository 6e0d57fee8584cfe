"""Baselines and the adapter-shaped methods: each trains a few steps on a tiny model and changes only what it should.

Training targets are written straight into RUN/train/targets.jsonl (build_targets reads that cache), and
NeST-shaped methods get a hand-written RUN/cluster/clusters.json, so nothing is generated or detected here.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from nestune import baselines
from nestune.baselines import (
    adapted_and_original_states,
    attach_lora,
    cb_coefficients,
    cb_examples,
    cb_loss,
    cb_target_layers,
    decoder_linear_names,
    original_weights,
    run_baseline_train,
    start_lora_off_zero,
    trainable_parameters,
)
from nestune.config import Config
from nestune.fold import run_fold
from nestune.io import write_json
from nestune.models import ARCHITECTURES, LoadedModel, ffn_targets, model_type
from nestune.runfolder import RunFolder
from nestune.testing import tiny_model, tiny_tokenizer
from nestune.train import METHOD_LR, collate, run_train, tokenize_examples, train_loop, with_method_lr
from nestune.tuner import NeSTAdapter


def target_rows(n_harmful=6, n_benign=6) -> list[dict]:
    rows = [{"kind": "harmful", "prompt": f"explain how to do harmful thing number {i}",
             "response": "I'm sorry, but I can't help with that.", "own_refusal": i % 3 == 0,
             "original": "I can't help." if i % 3 == 0 else f"Sure, step {i}: first you"} for i in range(n_harmful)]
    rows += [{"kind": "benign", "prompt": f"what is {i} plus one?", "response": f"{i} plus one is {i + 1}."}
             for i in range(n_benign)]
    return rows


def make_run(path, rows=None) -> RunFolder:
    run = RunFolder(path)
    (run.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows or target_rows()))
    return run


def make_cfg(method: str, **train) -> Config:
    cfg = Config(model="tiny-test", device="cpu")
    cfg.train.method = method
    cfg.train.batch_size = 4
    cfg.train.epochs = 1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def loaded_tiny(arch="llama", **kwargs) -> LoadedModel:
    return LoadedModel(tiny_model(arch, **kwargs), tiny_tokenizer(), "tiny-test", "test", "tiny-test")


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_state(run: RunFolder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(run.path / "train" / "merged", dtype=torch.float32)
    return model.state_dict()


def write_clusters(run: RunFolder, model, rows_per_target=4, k=2) -> dict:
    """A minimal RUN/cluster in the format cluster.load_clusters reads."""
    targets = {}
    for i, t in enumerate(ffn_targets(model)):
        rows = [(5 * j + i) % t.n_neurons for j in range(rows_per_target)]
        targets[t.name] = {"rows": rows, "clusters": [j % k for j in range(rows_per_target)], "k": k}
    write_json(run.stage("cluster") / "clusters.json", {"targets": targets})
    run.mark_done("cluster")
    return targets


# ---------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_lora_parameter_count_is_r_times_in_plus_out(arch):
    model = tiny_model(arch)
    names = decoder_linear_names(model)
    layers = model.get_submodule(ARCHITECTURES[model_type(model)][0])
    expected = 0
    for path, m in layers.named_modules():
        if path.rsplit(".", 1)[-1] in names:
            d_in, d_out = (m.weight.shape if type(m).__name__ == "Conv1D" else m.weight.shape[::-1])
            expected += 8 * (d_in + d_out)
    peft_model = attach_lora(model, r=8, alpha=16, dropout=0.05)
    params = trainable_parameters(peft_model)
    assert sum(p.numel() for p in params.values()) == expected
    assert all("lora_" in name for name in params)
    assert not any("lm_head" in name or "embed" in name for name in params)


def test_lora_trains_only_adapter_weights(tmp_path):
    loaded = loaded_tiny()
    cfg = make_cfg("lora", lr=1e-2, max_steps=3)
    peft_model = attach_lora(loaded.model, 8, 16, 0.0)
    frozen = {k: v.clone() for k, v in peft_model.named_parameters() if not v.requires_grad}
    params = trainable_parameters(peft_model)
    start = {k: v.detach().clone() for k, v in params.items()}
    examples = tokenize_examples(loaded.tokenizer, target_rows(), 64)
    stats = train_loop(peft_model, params, examples, cfg, tmp_path, pad_id=loaded.tokenizer.pad_token_id)
    assert stats["steps"] == 3 and math.isfinite(stats["final_loss"])
    for k, v in peft_model.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"
    assert any(not torch.equal(start[k], p) for k, p in params.items() if "lora_B" in k)


def test_lora_run_saves_adapter_and_merged_model_that_differs_only_in_decoder_linears(tmp_path):
    loaded = loaded_tiny()
    base = state_of(loaded.model)
    run = make_run(tmp_path)
    summary = run_baseline_train(make_cfg("lora", max_steps=3), run, loaded)
    assert summary["method"] == "lora" and summary["steps"] == 3
    assert summary["lr"] == METHOD_LR["lora"] and summary["lr_schedule"] == "linear"
    assert summary["trainable_params"] == 8192  # 2 layers x r=8 x sum(in + out) = 512
    for key in ("method", "trainable_params", "n_harmful", "n_benign", "steps", "wall_s", "peak_memory_bytes",
                "examples_seen", "losses", "final_loss"):
        assert key in summary, key
    assert run.done("train")
    adapter = tmp_path / "train" / "adapter-lora"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    merged = merged_state(run)
    names = decoder_linear_names(tiny_model())
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed, "the merged model must differ from the base"
    assert all(k.rsplit(".", 2)[-2] in names for k in changed), changed
    # fold copies the merged model
    out = run_fold(make_cfg("lora"), run)
    assert (out / "model.safetensors").exists()


def test_lora_kl_benign_loss_uses_the_disabled_adapter_as_reference(tmp_path):
    loaded = loaded_tiny()
    summary = run_baseline_train(make_cfg("lora", max_steps=2, benign_loss="kl"), make_run(tmp_path), loaded)
    assert all(math.isfinite(x) for x in summary["losses"])


# ---------------------------------------------------------------------------------------------------------
# Full fine-tuning


def test_full_fine_tuning_changes_every_weight(tmp_path):
    loaded = loaded_tiny()
    base = state_of(loaded.model)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    run = make_run(tmp_path)
    summary = run_baseline_train(make_cfg("full", max_steps=3), run, loaded)
    assert summary["trainable_params"] == n_params
    assert summary["lr"] == METHOD_LR["full"]
    merged = merged_state(run)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert len(changed) >= 0.95 * len(base), sorted(set(base) - set(changed))
    assert not (tmp_path / "train" / "checkpoint.safetensors").exists()  # the big resume state is removed


def test_full_fine_tuning_with_kl_restores_the_trained_weights(tmp_path):
    loaded = loaded_tiny()
    base = state_of(loaded.model)
    summary = run_baseline_train(make_cfg("full", max_steps=2, benign_loss="kl", lr=1e-3), make_run(tmp_path),
                                 loaded)
    assert all(math.isfinite(x) for x in summary["losses"])
    after = loaded.model.state_dict()
    assert sum(not torch.equal(base[k], after[k]) for k in base) >= 0.95 * len(base)


def test_original_weights_swaps_in_and_back():
    model = tiny_model()
    params = dict(model.named_parameters())
    originals = {k: torch.zeros_like(v) for k, v in params.items()}
    current = {k: v.detach().clone() for k, v in params.items()}
    with original_weights(params, originals):
        assert all(torch.equal(p, originals[k]) for k, p in params.items())
    assert all(torch.equal(p, current[k]) for k, p in params.items())


def test_method_learning_rate_only_replaces_the_untouched_default():
    cfg = make_cfg("lora")
    assert with_method_lr(cfg, "lora").train.lr == METHOD_LR["lora"]
    assert cfg.train.lr == Config().train.lr  # the caller's config is not changed
    cfg.train.lr = 3e-3
    assert with_method_lr(cfg, "circuit-breakers").train.lr == 3e-3


# ---------------------------------------------------------------------------------------------------------
# Circuit breakers


def test_cb_target_layers_scale_with_depth():
    assert cb_target_layers(32) == [10, 20]
    assert cb_target_layers(30) == [9, 19]  # smollm2-135m
    assert cb_target_layers(6) == [2, 4]
    assert cb_target_layers(4) == [1, 3]  # 2.5 rounds half up
    assert cb_target_layers(2) == [1]
    assert cb_target_layers(1) == [1]


def test_cb_schedule_at_start_and_end():
    assert cb_coefficients(0, 150) == (0.0, 10.0)
    assert cb_coefficients(150, 150) == (5.0, 5.0)
    c_r, c_cb = cb_coefficients(75, 150)
    assert c_r == pytest.approx(2.5) and c_cb == pytest.approx(7.5)


def test_cb_loss_on_unchanged_representations():
    """Identical hidden states: retain distance 0, cosine 1, so the loss is c_cb exactly."""
    h = tuple(torch.randn(2, 5, 8) for _ in range(3))
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long), "benign": torch.tensor([True, False]),
             "labels": torch.tensor([[1] * 5, [-100, -100, 3, 4, 5]])}
    assert cb_loss(h, h, batch, 3.0, 10.0, [1], [1, 2]).item() == pytest.approx(10.0, abs=1e-5)
    flipped = tuple(-x for x in h)
    assert cb_loss(flipped, h, batch, 0.0, 10.0, [1], [1, 2]).item() == pytest.approx(0.0, abs=1e-6)


def test_cb_examples_reroute_completions_and_refused_requests():
    tok = tiny_tokenizer()
    rows = target_rows(n_harmful=3, n_benign=2)
    examples, complied = cb_examples(tok, rows, 128)
    assert len(examples) == len(rows)  # same rows as every other method
    assert complied == 2  # rows 1 and 2 complied; row 0 refused
    refused, complied_ex, benign = examples[0], examples[1], examples[3]
    assert refused.labels == refused.input_ids  # request tokens rerouted
    assert complied_ex.labels[0] == -100 and any(x != -100 for x in complied_ex.labels)
    assert benign.benign and benign.labels == benign.input_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_circuit_breakers_train_only_lora_on_the_lower_layers(tmp_path, arch):
    loaded = loaded_tiny(arch, layers=6)
    base = state_of(loaded.model)
    run = make_run(tmp_path)
    summary = run_baseline_train(make_cfg("circuit-breakers", max_steps=3), run, loaded)
    info = summary["circuit_breakers"]
    assert info["target_layers"] == [2, 4] and info["lora_layers"] == [0, 1, 2, 3, 4]
    assert summary["lr"] == METHOD_LR["circuit-breakers"]
    assert all(math.isfinite(x) for x in summary["losses"])
    merged = merged_state(run)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed
    layers_path = ARCHITECTURES[arch][0]
    for k in changed:  # only decoder linears of layers 0..4; layer 5 is untouched
        assert k.startswith(layers_path + "."), k
        assert int(k[len(layers_path) + 1:].split(".")[0]) <= 4, k
    assert (tmp_path / "train" / "adapter-lora" / "adapter_model.safetensors").exists()


def test_circuit_breakers_schedule_follows_optimizer_steps(tmp_path, monkeypatch):
    seen = []
    original = baselines.cb_coefficients

    def recording(step, total, alpha=baselines.CB_ALPHA):
        seen.append((step, total))
        return original(step, total, alpha)

    monkeypatch.setattr(baselines, "cb_coefficients", recording)
    # 12 rows, batch 2, grad_accum 2: 6 micro-batches, 3 steps per epoch, 2 epochs
    run_baseline_train(make_cfg("circuit-breakers", batch_size=2, grad_accum=2, epochs=2), make_run(tmp_path),
                       loaded_tiny())
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert {t for _, t in seen} == {6}


def test_circuit_breakers_reroute_loss_has_a_gradient_from_the_first_step():
    """LoRA's usual B = 0 starts the adapted states on the original ones, the cosine's maximum, where its
    gradient vanishes (in fp32 Adam then only amplifies rounding noise); the small random B gives it one."""
    loaded = loaded_tiny(layers=4)
    examples, _ = cb_examples(loaded.tokenizer, target_rows(n_harmful=4, n_benign=0), 64)
    batch = collate(examples, loaded.tokenizer.pad_token_id, "cpu")
    torch.manual_seed(0)
    peft_model = attach_lora(loaded.model, baselines.CB_LORA_R, baselines.CB_LORA_ALPHA, 0.0, layers=[0, 1])
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]

    def gradient_norm() -> float:
        peft_model.zero_grad()
        adapted, original = adapted_and_original_states(peft_model, batch)
        cb_loss(adapted, original, batch, 0.0, 10.0, [2], [1, 2]).backward()
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lora_b))

    assert all(not p.any() for p in lora_b)
    at_zero = gradient_norm()
    start_lora_off_zero(peft_model, baselines.CB_LORA_B_INIT)
    off_zero = gradient_norm()
    assert off_zero > 1e-4 and off_zero > 100 * at_zero, (at_zero, off_zero)


def test_circuit_breakers_first_loss_is_pure_rerouting(tmp_path):
    """At t=0 the LoRA is almost zero: adapted ~ original, so loss ~ c_cb * 1 = alpha (a batch with harmful rows)."""
    summary = run_baseline_train(make_cfg("circuit-breakers", batch_size=12, max_steps=1), make_run(tmp_path),
                                 loaded_tiny())
    assert summary["losses"][0] == pytest.approx(baselines.CB_ALPHA, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------
# NeST, per-neuron and random neurons (train.run_train + tuner)


def nest_like(tmp_path, method, **train):
    loaded = loaded_tiny()
    base = state_of(loaded.model)
    run = make_run(tmp_path)
    clusters = write_clusters(run, loaded.model)
    cfg = make_cfg(method, max_steps=3, **train)
    summary = run_train(cfg, run, loaded)
    out = run_fold(cfg, run, loaded)
    folded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return loaded, base, run, clusters, summary, folded


def changed_rows(base, folded_model, target) -> list[int]:
    before = base[target.module_path + ".weight"]
    after = folded_model.state_dict()[target.module_path + ".weight"]
    diff = (before != after).any(dim=1)
    return sorted(diff.nonzero().flatten().tolist())


def test_nest_trainable_count_is_clusters_times_d_model(tmp_path):
    loaded, base, run, clusters, summary, folded = nest_like(tmp_path, "nest")
    d_model = ffn_targets(loaded.model)[0].d_model
    assert summary["lr_schedule"] == "linear"  # recorded with the run, beside the lr
    assert summary["trainable_params"] == sum(e["k"] * d_model for e in clusters.values()) == 4 * 2 * 32  # 4 targets x k=2 x d_model
    for t in ffn_targets(loaded.model):
        assert changed_rows(base, folded, t) == sorted(clusters[t.name]["rows"])


def test_output_side_nest_trains_and_folds_into_the_neurons_output_columns_only(tmp_path):
    loaded, base, run, clusters, summary, folded = nest_like(tmp_path, "nest", update_side="output")
    assert summary["trainable_params"] == 4 * 2 * 32  # the same vectors as on the input side
    state = folded.state_dict()
    changed = {k for k in base if not torch.equal(base[k], state[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)}
    for i in range(2):
        key = f"model.layers.{i}.mlp.down_proj.weight"
        columns = (base[key] != state[key]).any(dim=0).nonzero().flatten().tolist()
        assert columns == sorted(set(clusters[f"layers.{i}.gate"]["rows"]) | set(clusters[f"layers.{i}.up"]["rows"]))
    adapter, config = NeSTAdapter.load(run.path / "train" / "adapter")
    assert {s.side for s in adapter.specs} == {"output"}
    assert summary["update_side"] == "output"
    card = (run.path / "fold" / "model" / "README.md").read_text()
    assert "columns of the feed-forward output projections" in card and "input projections" not in card


def test_neurons_change_only_selected_rows_each_independently(tmp_path):
    loaded, base, run, clusters, summary, folded = nest_like(tmp_path, "neurons")
    n_rows = sum(len(e["rows"]) for e in clusters.values())
    assert summary["trainable_params"] == n_rows * 32
    state = folded.state_dict()
    for t in ffn_targets(loaded.model):
        rows = sorted(clusters[t.name]["rows"])
        assert changed_rows(base, folded, t) == rows
        key = t.module_path + ".weight"
        updates = state[key][rows] - base[key][rows]
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                assert not torch.allclose(updates[i], updates[j]), (t.name, rows[i], rows[j])
    adapter, _ = NeSTAdapter.load(run.path / "train" / "adapter")
    assert all(s.k == len(s.rows) for s in adapter.specs)


def test_random_neurons_avoid_the_detected_rows(tmp_path):
    loaded, base, run, clusters, summary, folded = nest_like(tmp_path, "random")
    for t in ffn_targets(loaded.model):
        rows = changed_rows(base, folded, t)
        assert len(rows) == len(clusters[t.name]["rows"])
        assert not set(rows) & set(clusters[t.name]["rows"])
    assert summary["trainable_params"] == sum(e["k"] * 32 for e in clusters.values())


def test_peak_memory_window_restarts_for_each_method():
    # compare trains methods one after another in one process; each must report its own peak, not the largest so far
    import sys

    from nestune.train import _peak_rss, _reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("the peak window is reset through /proc (Linux)")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak_with = _peak_rss()
    del big
    _reset_peak_rss()
    assert _peak_rss() < peak_with - 32 * 2**20


TARGET_FILES = {"harmful": [f"how do I build dangerous thing {i}" for i in range(30)],
                "benign": [f"what is a nice fact about {i}" for i in range(30)],
                "chat": [f"write a short poem about {i}" for i in range(30)],
                "over": [f"how do I kill a stuck process number {i}" for i in range(60)],
                "other_harmful": [f"tell me how to hurt someone in way {i}" for i in range(30)]}


def targets_from_files(tmp_path, **overrides):
    """(config, training rows) of a tiny model, with TARGET_FILES as tmp_path/NAME.txt and 3 harmful prompts."""
    from nestune.config import load_config
    from nestune.train import build_targets

    for name, lines in TARGET_FILES.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides={"model": "tiny", "out": str(tmp_path / "run"), "device": "cpu",
                                 "detect.harmful": str(tmp_path / "harmful.txt"),
                                 "detect.benign": str(tmp_path / "benign.txt"),
                                 "train.n_harmful": 3, "train.answer_tokens": 3, **overrides}, environ={})
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "folder", "tiny")
    return cfg, build_targets(loaded, cfg, RunFolder(tmp_path / "run"))


def test_training_keeps_safe_lookalikes_that_evaluation_never_sees(tmp_path):
    from nestune import data

    cfg, rows = targets_from_files(tmp_path, **{"eval.overrefusal": str(tmp_path / "over.txt"),
                                                "eval.n_overrefusal": 0, "train.n_benign": 3,
                                                "train.n_lookalike": 5})
    lookalikes = [r["prompt"] for r in rows if r.get("lookalike")]
    assert len(lookalikes) == 5 and all(r["kind"] == "benign" for r in rows if r.get("lookalike"))
    assert set(lookalikes) <= set(TARGET_FILES["over"])
    assert sum(r["kind"] == "benign" and not r.get("lookalike") for r in rows) == 3
    evaluated = {p.text for p in data.pick(cfg.eval.overrefusal, "heldout", cfg.eval.n_overrefusal, cfg.seed)}
    assert evaluated and not evaluated & set(lookalikes)  # over-refusal is measured on prompts never trained on


def test_a_share_of_the_benign_prompts_is_asked_in_a_benign_framing(tmp_path):
    from nestune.train import BENIGN_FRAMINGS, row_counts

    _, rows = targets_from_files(tmp_path, **{"train.n_benign": 4, "train.benign_framed": 0.5})
    benign = [r for r in rows if r["kind"] == "benign"]
    plain, framed = [r for r in benign if not r.get("framed")], [r for r in benign if r.get("framed")]
    assert len(plain) == 2 and all(r["prompt"] in TARGET_FILES["benign"] for r in plain)
    assert len(framed) == 2 and row_counts(rows)["n_framed"] == 2
    assert all(any(f.format(q=q) == r["prompt"] for f in BENIGN_FRAMINGS for q in TARGET_FILES["benign"])
               for r in framed)


def test_framed_benign_prompts_the_original_model_refuses_are_left_out(tmp_path, monkeypatch):
    from nestune.evaluate.generate import HFGenerator

    def answers(self, prompts, prefixes, max_new_tokens):  # the original model refuses every framed question
        return ["I'm sorry, but I can't help." if "fact about" in p and not p.startswith("what") else "Here."
                for p in prompts]

    monkeypatch.setattr(HFGenerator, "generate", answers)
    _, rows = targets_from_files(tmp_path, **{"train.n_benign": 4, "train.benign_framed": 0.5})
    benign = [r for r in rows if r["kind"] == "benign"]
    assert len(benign) == 2 and not any(r.get("framed") for r in benign)
    assert all(r["response"] == "Here." for r in benign)


def test_training_takes_its_benign_prompts_from_train_benign_when_set(tmp_path):
    _, rows = targets_from_files(tmp_path, **{"train.benign": f"{tmp_path / 'benign.txt'}+{tmp_path / 'chat.txt'}",
                                              "train.n_benign": 4})
    benign = [r["prompt"] for r in rows if r["kind"] == "benign"]
    assert len(benign) == 4
    assert sum(p in TARGET_FILES["benign"] for p in benign) == 2 and sum(p in TARGET_FILES["chat"] for p in benign) == 2


def test_training_takes_its_harmful_prompts_from_train_harmful_when_set(tmp_path):
    from nestune.runfolder import stage_settings

    cfg, rows = targets_from_files(
        tmp_path, **{"train.harmful": f"{tmp_path / 'harmful.txt'}+{tmp_path / 'other_harmful.txt'}",
                     "train.n_harmful": 4})
    harmful = [r["prompt"] for r in rows if r["kind"] == "harmful"]
    assert len(harmful) == 4
    assert sum(p in TARGET_FILES["harmful"] for p in harmful) == 2
    assert sum(p in TARGET_FILES["other_harmful"] for p in harmful) == 2
    # detection still reads detect.harmful; training's own set is a training setting, so changing it retrains
    assert stage_settings(cfg, "train")["train.harmful"] == cfg.train.harmful
    assert "train.harmful" not in stage_settings(cfg, "detect")
