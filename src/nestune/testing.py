"""Tiny random models and a byte-level tokenizer with a chat template, for tests and benchmark smoke runs.

Every supported architecture is built from its config in well under a second, so unit tests exercise
the same code paths as real models without downloading anything.
"""

from __future__ import annotations

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 320  # 6 specials + 256 bytes, rounded up


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte) with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]


def tiny_config(arch: str, hidden: int = 32, layers: int = 2, d_ff: int = 64):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_inner=d_ff, n_positions=512, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=d_ff, max_position_embeddings=512, **common)
    classes = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
        "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
    }
    return classes[arch](hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=hidden // 2, intermediate_size=d_ff,
                         max_position_embeddings=512, **common)


def tiny_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    """A randomly initialised causal LM of the given architecture, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), dtype=torch.float32)
    return model.eval()


def save_tiny(path, arch: str = "llama", seed: int = 0, **config_kwargs):
    """Write a tiny model + tokenizer as a Hugging Face folder (for CLI tests)."""
    model = tiny_model(arch, seed, **config_kwargs)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_adapter(model, seed=0, rows_per_target=6, k=2, side="input"):
    """A NeST adapter on a few random rows of every target, in k clusters, with random non-zero deltas."""
    from .models import ffn_output, ffn_targets
    from .tuner import NeSTAdapter, TargetUpdate

    g = torch.Generator().manual_seed(seed)
    specs = []
    for t in ffn_targets(model):
        rows = torch.randperm(t.n_neurons, generator=g)[:rows_per_target].tolist()
        clusters = [i % k for i in range(len(rows))]
        specs.append(TargetUpdate.from_target(t, rows, clusters, ffn_output(model, t) if side == "output" else None))
    adapter = NeSTAdapter(specs)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5, generator=g)
    return adapter
