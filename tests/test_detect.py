"""Detection on tiny random models: capture, padding, probes, selection, the stage and its errors.

The planted-neuron model is the main check: chosen rows of gate_proj/up_proj in chosen layers are made to
read a direction of the residual stream that only two trigger tokens carry, so exactly those neurons tell
"harmful" prompts (with triggers) from benign ones (with a decoy token of the same shape instead).
"""

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from nestune.config import Config
from nestune.detect import (
    add_hooks,
    capture_pooled,
    heldout_split,
    load_selection,
    masked_max,
    padding_bias,
    run_detect,
    select_neurons,
    train_probes,
)
from nestune.errors import NestuneError
from nestune.io import read_json
from nestune.models import LoadedModel, encode_chat, ffn_targets, get_module
from nestune.runfolder import RunFolder
from nestune.testing import tiny_model, tiny_tokenizer

# ---------------------------------------------------------------------------------------------------------
# A model with planted safety neurons

TRIGGERS = {"~": [3, 17, 40], "^": [8, 25, 90]}  # trigger token -> planted rows (same rows in gate and up)
DECOY = "`"
PLANTED_LAYERS = [1, 2]
WORDS = "the a cat dog runs sees big small red blue house tree river stone bird fish quick slow under over".split()


@torch.no_grad()
def plant(model, tokenizer, triggers=TRIGGERS, layers=PLANTED_LAYERS, scale=30.0, strength=0.3):
    """Give each trigger token (and the decoy) its own residual direction that nothing else reads or writes.

    The directions are projected out of every embedding and of every weight that reads or writes the residual
    stream; each trigger's embedding is then the embedding of "a" turned partly into its direction (same
    norm), and its planted rows read that direction. The planted rows write nothing (down_proj columns 0).
    """
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d, len(triggers) + 1, generator=g))  # orthonormal columns
    keep = torch.eye(d) - u @ u.T
    emb = model.get_input_embeddings().weight
    emb.copy_(emb @ keep)
    base = emb[tokenizer.convert_tokens_to_ids("a")].clone()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight.copy_(lin.weight @ keep)
        for lin in (attn.o_proj, mlp.down_proj):
            lin.weight.copy_(keep @ lin.weight)
    for j, token in enumerate([*triggers, DECOY]):
        emb[tokenizer.convert_tokens_to_ids(token)] = (1 - strength**2) ** 0.5 * base + strength * base.norm() * u[:, j]
    for j, rows in enumerate(triggers.values()):
        for i in layers:
            mlp = model.model.layers[i].mlp
            mlp.gate_proj.weight[rows] = scale * u[:, j]
            mlp.up_proj.weight[rows] = scale * u[:, j]
            mlp.down_proj.weight[:, rows] = 0
    return model


def planted_prompts(n: int = 96, seed: int = 0) -> tuple[list[str], list[str]]:
    """Harmful: a third with trigger ~, a third with ^, a third with both; benign: the decoy in their place."""
    r = random.Random(seed)

    def sentence():
        return " ".join(r.choice(WORDS) for _ in range(r.randint(5, 9)))

    def insert(text, token):
        words = text.split()
        words.insert(r.randint(0, len(words)), token)
        return " ".join(words)

    harmful, benign = [], []
    for i in range(2 * n):
        first, second = ("~", "^") if i < n else (DECOY, DECOY)
        text = sentence()
        if i % 3 != 1:
            text = insert(text, first)
        if i % 3 != 0:
            text = insert(text, second)
        (harmful if i < n else benign).append(text)
    return harmful, benign


def planted_model(seed: int = 0) -> LoadedModel:
    tok = tiny_tokenizer()
    model = plant(tiny_model("llama", seed=seed, layers=3, d_ff=128), tok)
    return LoadedModel(model, tok, "tiny-planted", "test", "")


def truth() -> dict[str, set[int]]:
    rows = {r for rs in TRIGGERS.values() for r in rs}
    return {f"layers.{i}.{kind}": rows for i in PLANTED_LAYERS for kind in ("gate", "up")}


def small_config(**detect) -> Config:
    cfg = Config()
    for key, value in detect.items():
        setattr(cfg.detect, key, value)
    return cfg


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    run = RunFolder(tmp_path_factory.mktemp("planted"))
    harmful, benign = planted_prompts()
    summary = run_detect(small_config(), run, loaded=planted_model(), harmful=harmful, benign=benign)
    return run, summary


def test_planted_neurons_are_recovered(planted_run):
    run, summary = planted_run
    neurons = read_json(run.path / "detect" / "neurons.json")
    found = {(name, r) for name, e in neurons["targets"].items() for r in e["selected"]}
    planted = {(name, r) for name, rows in truth().items() for r in rows}
    hits = len(found & planted)
    assert hits / len(planted) >= 0.9, f"recall {hits}/{len(planted)}"
    assert hits / len(found) >= 0.9, f"precision {hits}/{len(found)}: {sorted(found - planted)}"
    for name in truth():
        assert neurons["targets"][name]["auc"] > 0.95
    assert summary["total_selected"] == len(found)


def test_detect_artifacts(planted_run):
    run, summary = planted_run
    out = run.path / "detect"
    for f in ("probes.safetensors", "activations.safetensors", "neurons.json", "neurons_per_layer.png", "DONE.json"):
        assert (out / f).exists(), f
    neurons = read_json(out / "neurons.json")
    probes = load_file(str(out / "probes.safetensors"))
    acts = load_file(str(out / "activations.safetensors"))
    n_prompts = neurons["n_harmful"] + neurons["n_benign"]
    assert acts["labels"].tolist() == [1] * neurons["n_harmful"] + [0] * neurons["n_benign"]
    for name, e in neurons["targets"].items():
        assert probes[f"{name}.weight"].shape == probes[f"{name}.z"].shape == (e["n_neurons"],)
        assert probes[f"{name}.bias"].shape == (1,)
        assert e["n_selected"] == len(e["selected"])
        if e["selected"]:
            assert acts[name].shape == (n_prompts, e["n_selected"])
            assert (probes[f"{name}.z"][e["selected"]] > neurons["z_threshold"]).all()
        else:
            assert name not in acts
    assert neurons["total_neurons"] == sum(e["n_neurons"] for e in neurons["targets"].values())
    assert math.isclose(neurons["share"], neurons["total_selected"] / neurons["total_neurons"])
    assert len(neurons["prompts"]["ids"]) == n_prompts
    assert sum(neurons["prompts"]["heldout"]) == summary["n_heldout"] == 48  # 25% of 96 per class
    assert read_json(out / "DONE.json")["total_selected"] == summary["total_selected"]


def test_load_selection(planted_run):
    run, _ = planted_run
    targets, selected = load_selection(run)
    assert [t.name for t in targets] == [t.name for t in ffn_targets(planted_model().model)]
    assert targets == ffn_targets(planted_model().model)
    assert set(truth()) <= set(selected)
    assert all(rows for rows in selected.values())


def test_detection_is_deterministic(planted_run, tmp_path):
    run, _ = planted_run
    harmful, benign = planted_prompts()
    again = RunFolder(tmp_path)
    run_detect(small_config(), again, loaded=planted_model(), harmful=harmful, benign=benign)
    a = read_json(run.path / "detect" / "neurons.json")["targets"]
    b = read_json(again.path / "detect" / "neurons.json")["targets"]
    assert {k: v["selected"] for k, v in a.items()} == {k: v["selected"] for k, v in b.items()}
    pa, pb = (load_file(str(r.path / "detect" / "probes.safetensors")) for r in (run, again))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ---------------------------------------------------------------------------------------------------------
# Capture


def test_masked_max_ignores_padding():
    values = torch.tensor([[[5.0], [1.0], [2.0]]])
    bias = padding_bias(torch.tensor([[0, 1, 1]]), values.dtype)
    assert masked_max(values, bias).item() == 2.0
    assert masked_max(-values, bias).item() == -1.0
    assert masked_max(values.bfloat16(), padding_bias(torch.tensor([[1, 1, 1]]), torch.bfloat16)).item() == 5.0


@pytest.mark.parametrize("pool", ["max", "last"])
@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_padding_does_not_change_pooled_values(arch, pool):
    model, tok = tiny_model(arch), tiny_tokenizer()
    targets = ffn_targets(model)
    short = "how are you"
    long = "please tell me a very long story about " + "the river and the stone " * 8
    alone = capture_pooled(model, tok, [short], targets, batch_size=4, max_length=256, pool=pool)
    batched = capture_pooled(model, tok, [short, long], targets, batch_size=4, max_length=256, pool=pool)
    for t in targets:
        assert alone[t.name].shape == (1, t.n_neurons)
        torch.testing.assert_close(batched[t.name][0], alone[t.name][0], atol=1e-5, rtol=0)


def test_last_pool_is_the_projection_output_at_the_last_prompt_token():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    targets = ffn_targets(model)
    text = "please tell me about the river"
    seen = {}
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model(**encode_chat(tok, [text], 64))
    handle.remove()
    last = capture_pooled(model, tok, [text], targets, 1, 64, pool="last")["layers.1.up"][0]
    largest = capture_pooled(model, tok, [text], targets, 1, 64, pool="max")["layers.1.up"][0]
    torch.testing.assert_close(last, seen["out"][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(largest, seen["out"][0].amax(0), atol=1e-5, rtol=0)
    assert (largest >= last).all() and (largest > last).any()


def test_unknown_pool_is_refused_before_loading(tmp_path):
    cfg = small_config()
    cfg.detect.pool = "mean"
    with pytest.raises(NestuneError, match="detect.pool") as e:
        run_detect(cfg, RunFolder(tmp_path), loaded=None, harmful=PROMPTS_H, benign=PROMPTS_B)
    assert "max, last" in e.value.fix


def test_fused_targets_are_the_two_halves():
    model, tok = tiny_model("phi3"), tiny_tokenizer()
    targets = ffn_targets(model)
    pooled = capture_pooled(model, tok, ["hello there", "what is this"], targets, 2, 64)
    gate, up = pooled["layers.0.gate"], pooled["layers.0.up"]
    assert gate.shape == up.shape == (2, targets[0].n_neurons)
    assert not torch.equal(gate, up)


def test_hooks_are_removed_on_error():
    model = tiny_model("llama")
    module = get_module(model, "model.layers.0.mlp.gate_proj")

    def boom(*args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), add_hooks([(module, boom)]):
        model(torch.tensor([[1, 2, 3]]))
    assert not module._forward_hooks


def test_non_finite_activations_name_the_module():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NestuneError, match=r"model\.layers\.1\.mlp\.up_proj"):
        capture_pooled(model, tok, ["hello"], ffn_targets(model), 1, 32)


# ---------------------------------------------------------------------------------------------------------
# Probes and selection


def synthetic(n=400, width=32, informative=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * (n // 2))
    x = torch.randn(n, width, generator=g)
    x[:, informative] += 3 * labels
    return x, labels


def test_probe_finds_the_informative_neuron():
    x, labels = synthetic()
    heldout = heldout_split(labels, 0.25, 0)
    probes = train_probes({"a": x, "b": x * 100 + 7, "c": x[:, :16]}, labels, 500, 1e-2, 1e-3, 0, heldout)
    assert list(probes) == ["a", "b", "c"]
    for name in ("a", "b"):
        assert probes[name]["weight"].argmax().item() == 5
        assert probes[name]["auc"] > 0.95
        assert probes[name]["train_acc"] > 0.9
    # standardised features: scaling a neuron does not change its probe weight
    torch.testing.assert_close(probes["a"]["weight"], probes["b"]["weight"], atol=1e-3, rtol=1e-3)
    assert probes["c"]["weight"].shape == (16,)


def test_probes_do_not_depend_on_how_modules_are_stacked(monkeypatch):
    """One stack per core or one module per stack: the same probes up to float rounding, the same selection."""
    from nestune import detect

    features = {f"m{i}": synthetic(width=48, informative=i, seed=i)[0] for i in range(6)}
    labels = synthetic()[1]
    heldout = heldout_split(labels, 0.25, 0)
    stacked = train_probes(features, labels, 300, 1e-2, 1e-3, 0, heldout)
    monkeypatch.setattr(detect, "CPU_STACK_MAX_BYTES", 1)  # every module alone
    alone = train_probes(features, labels, 300, 1e-2, 1e-3, 0, heldout)
    for i, name in enumerate(features):
        torch.testing.assert_close(stacked[name]["weight"], alone[name]["weight"], atol=1e-5, rtol=1e-4)
        assert select_neurons(stacked[name]["weight"], 3.0, "positive")[0].tolist() == [i]
        assert select_neurons(alone[name]["weight"], 3.0, "positive")[0].tolist() == [i]


def test_probe_without_heldout_has_nan_auc():
    x, labels = synthetic()
    probes = train_probes({"a": x}, labels, 50, 1e-2, 1e-3, 0, None)
    assert math.isnan(probes["a"]["auc"])


def test_constant_neurons_get_zero_weight():
    x, labels = synthetic()
    x[:, 0] = 4.2
    probes = train_probes({"a": x}, labels, 200, 1e-2, 1e-3, 0, None)
    assert probes["a"]["weight"][0] == 0


def test_select_neurons_signs():
    w = torch.zeros(100)
    w[7], w[9] = 10.0, -10.0
    pos, z = select_neurons(w, 3.0, "positive")
    assert pos.tolist() == [7] and z[7] > 3
    assert select_neurons(w, 3.0, "negative")[0].tolist() == [9]
    assert select_neurons(w, 3.0, "both")[0].tolist() == [7, 9]
    none, z = select_neurons(torch.ones(10), 3.0, "both")
    assert none.numel() == 0 and (z == 0).all()


def test_heldout_split_is_stratified_and_seeded():
    labels = torch.tensor([1] * 40 + [0] * 40)
    mask = heldout_split(labels, 0.25, 3)
    assert mask[labels == 1].sum() == 10 and mask[labels == 0].sum() == 10
    assert torch.equal(mask, heldout_split(labels, 0.25, 3))
    assert not torch.equal(mask, heldout_split(labels, 0.25, 4))
    assert heldout_split(labels, 0.0, 0).sum() == 0


# ---------------------------------------------------------------------------------------------------------
# The stage on each kind of MLP, and its errors

PROMPTS_H = [f"how do I build dangerous thing number {i} at home" for i in range(20)]
PROMPTS_B = [f"what is a nice fact about the number {i}" for i in range(20)]


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_detect_and_cluster_end_to_end(arch, tmp_path):
    from nestune.cluster import run_cluster

    cfg = small_config(z_threshold=1.0, probe_epochs=300, min_prompts=8)
    run = RunFolder(tmp_path)
    model = tiny_model(arch)
    summary = run_detect(cfg, run, loaded=LoadedModel(model, tiny_tokenizer(), arch, "test", ""),
                         harmful=PROMPTS_H, benign=PROMPTS_B)
    assert summary["total_selected"] > 0
    assert run.done("detect")
    kinds = {e["kind"] for e in read_json(run.path / "detect" / "neurons.json")["targets"].values()}
    assert kinds == ({"fc"} if arch == "gpt2" else {"gate", "up"})
    run_cluster(cfg, run)
    assert run.done("cluster")
    for f in ("clusters.json", "cluster_sizes.png"):
        assert (run.path / "cluster" / f).exists()


def test_no_neuron_over_threshold(tmp_path):
    cfg = small_config(z_threshold=50.0, probe_epochs=50, min_prompts=8)
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "test", "")
    with pytest.raises(NestuneError) as e:
        run_detect(cfg, RunFolder(tmp_path), loaded=loaded, harmful=PROMPTS_H, benign=PROMPTS_B)
    assert "largest z-score is" in e.value.cause
    assert "--set detect.z_threshold=" in e.value.fix
    suggested = float(e.value.fix.split("=")[-1])
    assert 0 < suggested < 50
    assert not (tmp_path / "detect" / "DONE.json").exists()


def test_too_few_prompts(tmp_path):
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "test", "")
    with pytest.raises(NestuneError, match="at least 16"):
        run_detect(small_config(), RunFolder(tmp_path), loaded=loaded, harmful=PROMPTS_H[:5], benign=PROMPTS_B)
    with pytest.raises(NestuneError, match="empty"):
        run_detect(small_config(), RunFolder(tmp_path), loaded=loaded, harmful=PROMPTS_H, benign=[])


def test_unbalanced_sets_are_truncated(tmp_path, capsys):
    cfg = small_config(z_threshold=1.0, probe_epochs=50, min_prompts=8)
    loaded = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny", "test", "")
    summary = run_detect(cfg, RunFolder(tmp_path), loaded=loaded, harmful=PROMPTS_H, benign=PROMPTS_B[:12])
    assert summary["n_harmful"] == summary["n_benign"] == 12
    assert "warning" in capsys.readouterr().out
