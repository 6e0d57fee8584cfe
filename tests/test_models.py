"""The architecture map and model loading, on tiny random models of every supported architecture."""

import pytest
import torch

from nestune.errors import NestuneError
from nestune.models import (
    ARCHITECTURES,
    chat_prompts,
    encode_chat,
    ffn_targets,
    get_module,
    load_model,
    neuron_weight,
)
from nestune.testing import TINY_ARCHS, save_tiny, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_map_finds_the_ffn_input_projections(arch):
    model = tiny_model(arch, layers=3, hidden=32, d_ff=64)
    targets = ffn_targets(model)
    kinds = [k for _, k, _ in ARCHITECTURES[arch][1]]
    assert [t.kind for t in targets] == kinds * 3
    assert [t.layer for t in targets] == [i for i in range(3) for _ in kinds]
    for t in targets:
        module = get_module(model, t.module_path)
        assert t.n_neurons == 64 and t.d_model == 32
        assert neuron_weight(module, t).shape == (64, 32)
        # The neuron's activation is the module output's column offset + i: check it on a random input.
        x = torch.randn(5, 32)
        out = module(x)[:, t.offset:t.offset + t.n_neurons]
        bias = module.bias[t.offset:t.offset + t.n_neurons] if module.bias is not None else 0
        assert torch.allclose(out, x @ neuron_weight(module, t).t() + bias, atol=1e-5)


def test_fused_phi3_is_split_into_gate_and_up_halves():
    targets = ffn_targets(tiny_model("phi3"))
    gate, up = targets[0], targets[1]
    assert gate.module_path == up.module_path and gate.module_path.endswith("gate_up_proj")
    assert (gate.kind, gate.offset) == ("gate", 0) and (up.kind, up.offset) == ("up", 64)


def test_unsupported_architecture_names_the_type_and_the_supported_list():
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_config(tf.OPTConfig(hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, ffn_dim=32, vocab_size=50,
                                                             word_embed_proj_dim=16))
    with pytest.raises(NestuneError) as e:
        ffn_targets(model)
    assert "opt" in str(e.value) and "llama" in str(e.value)


def test_chat_template_is_applied_with_generation_prompt():
    tok = tiny_tokenizer()
    assert chat_prompts(tok, ["hi"]) == ["<|user|>hi</s><|assistant|>"]
    batch = encode_chat(tok, ["hi", "a longer prompt"], max_length=64)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    assert batch["input_ids"][0, -1] == batch["input_ids"][1, -1]  # both end on the generation prompt


def test_missing_chat_template_is_a_clear_error():
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(NestuneError, match="no chat template"):
        chat_prompts(tok, ["hi"])


def test_load_local_folder(tmp_path):
    save_tiny(tmp_path / "m", "qwen2")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.source == "folder" and loaded.model.dtype == torch.float32
    assert len(ffn_targets(loaded.model)) == 4


@pytest.mark.parametrize("spec,match", [
    ("./no/such/folder", "does not exist"),
    ("/tmp/definitely-missing.gguf", "does not exist"),
])
def test_bad_model_paths(spec, match):
    with pytest.raises(NestuneError, match=match):
        load_model(spec, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(NestuneError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(NestuneError, match="corrupt"):
        load_model(str(bad), device="cpu")


def test_evaluation_dtype_is_bf16_where_the_device_computes_it_natively_unless_one_is_asked_for(monkeypatch):
    from nestune import models

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "native_bf16", lambda device, native=native: native)
        assert models.evaluation_dtype("auto", "cpu") == expected
        assert models.evaluation_dtype("fp32", "cpu") == torch.float32
        assert models.evaluation_dtype("fp16", "cpu") == torch.float16
        assert models.default_dtype("cpu") == torch.float32  # training: fp32 on every CPU
    monkeypatch.undo()
    assert models.native_bf16("cuda:0")
