"""The cluster-update adapter: forward, fold equivalence, untouched weights, parameter count, save/load."""

import pytest
import torch

from nestune.errors import NestuneError
from nestune.models import ARCHITECTURES, FFN_OUTPUTS, ffn_targets, get_module, neuron_weight
from nestune.testing import TINY_ARCHS, random_adapter, tiny_model
from nestune.tuner import NeSTAdapter, _neurons_are_columns, base_identity, check_same_base


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # some left padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fold_matches_adapter_and_leaves_other_weights_bit_identical(arch, side):
    model = tiny_model(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = batch()
    with torch.no_grad():
        base_logits = model(**inputs).logits
    adapter = random_adapter(model, side=side).attach(model)
    assert adapter.num_trainable() == random_adapter(tiny_model(arch)).num_trainable()  # the same vectors either side
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert (adapted - base_logits).abs().max() > 1e-3, "the adapter must change the output"
        with adapter.disabled():
            assert torch.equal(model(**inputs).logits, base_logits)
    adapter.fold(model)
    with torch.no_grad():
        folded = model(**inputs).logits
    assert (folded - adapted).abs().max() < 1e-4

    # Every tensor outside the selected neurons' rows (input side) or output-projection columns (output side; the
    # gate and up rows of one neuron share its column) is bit-identical; those rows or columns changed.
    state = model.state_dict()
    touched = {}  # weight key -> (neuron indices along its neuron axis, whether neurons are its columns)
    for spec in adapter.specs:
        assert spec.side == side and (side == "input" or spec.output_path.endswith(FFN_OUTPUTS[arch]))
        neurons = [r + (spec.offset if side == "input" else 0) for r in spec.rows]
        touched.setdefault(spec.hooked_path + ".weight", (set(), _neurons_are_columns(spec)))[0].update(neurons)
    for key, before in base.items():
        after = state[key]
        if key not in touched:
            assert torch.equal(before, after), key
            continue
        neurons, columns = touched[key]
        if columns:
            before, after = before.t(), after.t()
        mask = torch.zeros(before.shape[0], dtype=torch.bool)
        mask[sorted(neurons)] = True
        assert torch.equal(before[~mask], after[~mask]), key
        assert not torch.equal(before[mask], after[mask]), key


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])  # plain, fused gate_up (offset), Conv1D (transposed)
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.5])
def test_scaled_fold_moves_the_rows_by_that_share_of_the_update(arch, scale):
    base_model, model = tiny_model(arch), tiny_model(arch)
    full, scaled = random_adapter(base_model), random_adapter(model)
    full.fold(base_model)
    before = {k: v.clone() for k, v in tiny_model(arch).state_dict().items()}
    scaled.scale(scale).fold(model)
    for key, w in model.state_dict().items():
        assert torch.allclose(w - before[key], scale * (base_model.state_dict()[key] - before[key]), atol=1e-6), key
    if scale == 0:
        assert all(torch.equal(w, before[k]) for k, w in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_parameter_count_and_shared_updates(arch):
    model = tiny_model(arch)
    adapter = random_adapter(model, k=3)
    expected = sum(s.k * s.d_model for s in adapter.specs)
    assert adapter.num_trainable() == expected
    before = {t.name: neuron_weight(get_module(model, t.module_path), t).clone() for t in ffn_targets(model)}
    adapter.attach(model)
    adapter.fold(model)
    for spec in adapter.specs:
        t = next(t for t in ffn_targets(model) if t.name == spec.name)
        diff = neuron_weight(get_module(model, t.module_path), t) - before[t.name]
        for c in range(spec.k):
            rows = [r for r, cl in zip(spec.rows, spec.clusters) if cl == c]
            for r in rows[1:]:  # every row of a cluster received the same update
                assert torch.allclose(diff[r], diff[rows[0]], atol=1e-6)


def test_gradients_only_reach_deltas():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = random_adapter(model).attach(model)
    out = model(**batch()).logits.sum()
    out.backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert all(p.grad is None for p in model.parameters() if p not in set(adapter.parameters()))


def test_every_architecture_names_its_ffn_output_projection():
    assert set(FFN_OUTPUTS) == set(ARCHITECTURES)


def test_output_side_adapter_saves_and_loads_its_side_and_old_adapters_load_as_input_side(tmp_path):
    import json

    model = tiny_model("gpt2")  # Conv1D output projection
    inputs = batch(1)
    adapter = random_adapter(model, side="output").attach(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    adapter.detach()
    adapter.save(tmp_path / "out", base_identity(model, "tiny-gpt2"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted({f"transformer.h.{i}.mlp.c_proj" for i in range(2)})
    loaded, _ = NeSTAdapter.load(tmp_path / "out")
    fresh = tiny_model("gpt2")
    loaded.fold(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, expected, atol=1e-5)

    random_adapter(model).save(tmp_path / "old", base_identity(model, "tiny-gpt2"))
    path = tmp_path / "old" / "adapter_config.json"
    config = json.loads(path.read_text())
    for t in config["targets"]:  # as written before update_side existed
        for key in ("side", "output_path", "output_transposed"):
            del t[key]
    path.write_text(json.dumps(config))
    assert {s.side for s in NeSTAdapter.load(tmp_path / "old")[0].specs} == {"input"}


def test_save_load_apply_reproduces_logits(tmp_path):
    model = tiny_model("qwen2")
    inputs = batch(1)
    adapter = random_adapter(model).attach(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    adapter.detach()
    adapter.save(tmp_path / "adapter", base_identity(model, "tiny-qwen2"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]

    fresh = tiny_model("qwen2")
    loaded, config = NeSTAdapter.load(tmp_path / "adapter")
    check_same_base(config, fresh)
    loaded.attach(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, expected, atol=1e-6)


def test_apply_to_other_base_is_refused(tmp_path):
    model = tiny_model("llama", seed=0)
    adapter = random_adapter(model)
    adapter.save(tmp_path, base_identity(model, "tiny"))
    _, config = NeSTAdapter.load(tmp_path)
    with pytest.raises(NestuneError, match="trained on"):
        check_same_base(config, tiny_model("llama", seed=1))


def test_an_adapter_trained_in_fp32_applies_to_its_base_in_bf16_and_old_adapters_still_apply(tmp_path):
    from nestune.models import weights_fingerprint

    model = tiny_model("llama", seed=0)
    adapter = random_adapter(model)
    adapter.save(tmp_path, base_identity(model, "tiny"))
    _, config = NeSTAdapter.load(tmp_path)
    check_same_base(config, tiny_model("llama", seed=0).to(torch.bfloat16))  # training on CPU, evaluation on GPU
    with pytest.raises(NestuneError, match="trained on"):
        check_same_base(config, tiny_model("llama", seed=1).to(torch.bfloat16))
    # An adapter saved before the fingerprint ignored the dtype carries the float32 one.
    legacy = weights_fingerprint(model, legacy=True)
    assert legacy != config["base_weights_hash"]
    check_same_base({**config, "base_weights_hash": legacy}, tiny_model("llama", seed=0))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])  # plain, fused gate_up (offset), Conv1D (transposed)
def test_relative_lr_scales_each_first_step_by_the_rms_of_its_rows(arch, tmp_path):
    from nestune.config import Config
    from nestune.train import Example, train_loop

    model = tiny_model(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = {t.name: t for t in ffn_targets(model)}
    adapter = random_adapter(model)
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
        # Make one target's weights 10x larger: its scale (and so its step) must follow.
        first = adapter.specs[0]
        get_module(model, first.module_path).weight.mul_(10)
    adapter.attach(model)
    scales = adapter.row_scales(model)
    for spec in adapter.specs:
        rows = neuron_weight(get_module(model, spec.module_path), targets[spec.name])[list(spec.rows)]
        expected = rows.float().pow(2).mean().sqrt().item()
        assert scales[f"updates.{spec.name.replace('.', '_')}.delta"] == pytest.approx(expected, rel=1e-5)

    cfg = Config()
    cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size = 0.5, 1, 2
    examples = [Example(list(range(10, 22)), [-100] * 6 + list(range(16, 22)), False) for _ in range(2)]
    params = dict(adapter.named_parameters())
    train_loop(model, params, examples, cfg, tmp_path, lr_scales=scales)
    for name, p in params.items():
        # Adam's first step moves every element with a gradient by lr (sign of the gradient) x its scale.
        moved = p.detach().abs()
        moved = moved[moved > 0]
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, 0.5 * scales[name]), rtol=1e-3)
