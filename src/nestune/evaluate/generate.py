"""Greedy generation for evaluation: Hugging Face (default) or vLLM, behind one small interface.

    generator.generate(user_texts, prefixes, max_new_tokens) -> completions

Each user text goes through the model's chat template with the generation prompt added; a non-empty
prefix (assistant prefill) is appended to the rendered prompt, and the returned completion starts with
that prefix, so a judge sees the whole answer. `settings` records what decides the outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria

from ..errors import NestuneError
from ..models import chat_prompts, input_device

DEFAULT_MAX_LENGTH = 2048  # prompt tokens; the longest default template (AIM) is ~450 tokens


class Generator:
    """The interface; `settings` is a JSON-ready dict of decoding settings, saved with every result."""

    settings: dict

    def generate(self, user_texts: list[str], prefixes: list[str] | None = None,
                 max_new_tokens: int = 64) -> list[str]:
        raise NotImplementedError


def render(tokenizer, user_texts: list[str], prefixes: list[str] | None) -> list[str]:
    """Chat-rendered prompts with each assistant prefix appended after the generation prompt."""
    prefixes = prefixes or [""] * len(user_texts)
    return [r + p for r, p in zip(chat_prompts(tokenizer, user_texts), prefixes)]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (less padding; memory errors show early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the model's generation config may name several (Qwen: <|im_end|> and <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class StopWhenDecided(StoppingCriteria):
    """Per-row stopping: a row stops once `decided(prefix + text so far)` is True.

    Returns a bool tensor with one entry per row (transformers >= 4.39 stops rows individually and pads
    the stopped rows); the batch ends when every row has stopped or reached the budget.
    """

    def __init__(self, tokenizer, prompt_length: int, prefixes: list[str], decided: Callable[[str], bool]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.prefixes = prefixes
        self.decided = decided

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [self.decided(p + t) for p, t in zip(self.prefixes, texts)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFGenerator(Generator):
    """Greedy, batched generation with transformers' `generate`, left padding, length-sorted batches."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH,
                 stop_when_decided: Callable[[str], bool] | None = None, show_progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.stop_when_decided = stop_when_decided
        self.show_progress = show_progress
        self.settings = {"generator": "hf", "greedy": True, "batch_size": self.batch_size,
                         "max_prompt_tokens": max_length, "early_stop": stop_when_decided is not None}

    def with_stop(self, stop_when_decided: Callable[[str], bool] | None) -> HFGenerator:
        """The same generator with another early-stopping rule (or none)."""
        return HFGenerator(self.model, self.tokenizer, self.batch_size, self.max_length, stop_when_decided,
                           self.show_progress)

    def generate(self, user_texts: list[str], prefixes: list[str] | None = None,
                 max_new_tokens: int = 64) -> list[str]:
        from tqdm.auto import tqdm

        if not user_texts:
            return []
        prefixes = list(prefixes) if prefixes else [""] * len(user_texts)
        rendered = render(self.tokenizer, user_texts, prefixes)
        lengths = [len(ids) for ids in self.tokenizer(rendered, add_special_tokens=False)["input_ids"]]
        out: list[str] = [""] * len(rendered)
        with tqdm(total=len(rendered), desc="generate", unit="prompt", disable=not self.show_progress,
                  leave=False) as bar:
            for batch in length_sorted_batches(lengths, self.batch_size):
                texts = self._generate_batch([rendered[i] for i in batch], [prefixes[i] for i in batch],
                                             max_new_tokens)
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.update(len(batch))
        return out

    @torch.no_grad()
    def _generate_batch(self, rendered: list[str], prefixes: list[str], max_new_tokens: int) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the last position of every row
        tok.truncation_side = "left"  # over-long prompts keep their end (the generation prompt)
        enc = tok(rendered, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                  add_special_tokens=False)
        device = input_device(self.model)
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc["attention_mask"].to(device)
        stops = stop_token_ids(self.model, tok)
        # A fresh config, so a model's own sampling defaults (temperature, top_p) never apply: greedy.
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1,
                                  pad_token_id=tok.pad_token_id, eos_token_id=stops)
        criteria = None
        if self.stop_when_decided is not None:
            criteria = StoppingCriteriaList([StopWhenDecided(tok, input_ids.shape[1], prefixes,
                                                             self.stop_when_decided)])
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                     stopping_criteria=criteria)
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        ends = set(stops) | {tok.pad_token_id}
        return [p + tok.decode(_until(ids, ends), skip_special_tokens=True) for p, ids in zip(prefixes, new_tokens)]


def _until(ids: list[int], ends: set[int]) -> list[int]:
    """Tokens before the first end-of-turn or pad token."""
    for i, t in enumerate(ids):
        if t in ends:
            return ids[:i]
    return ids


class VLLMGenerator(Generator):
    """Greedy generation with vLLM (a second copy of the weights; GPU only). Same interface as HFGenerator.

    The model must be a folder or hub id vLLM can read (catalog models are converted to safetensors first).
    """

    def __init__(self, model_path: str, tokenizer, max_length: int = DEFAULT_MAX_LENGTH,
                 gpu_memory_utilization: float = 0.5, trust_remote_code: bool = False):
        try:
            from vllm import LLM
        except ImportError:
            raise NestuneError("vLLM is not installed",
                               "pip install 'nestune[vllm]' or use --generator hf") from None
        self.tokenizer = tokenizer
        self.max_length = max_length
        # The Hugging Face copy of the model stays loaded beside it, hence the memory share.
        self.llm = LLM(model=model_path, tokenizer=model_path, max_model_len=max_length + 1024,
                       gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
        self.settings = {"generator": "vllm", "greedy": True, "batch_size": "continuous",
                         "max_prompt_tokens": max_length, "early_stop": False}

    def generate(self, user_texts: list[str], prefixes: list[str] | None = None,
                 max_new_tokens: int = 64) -> list[str]:
        from vllm import SamplingParams

        if not user_texts:
            return []
        prefixes = list(prefixes) if prefixes else [""] * len(user_texts)
        prompts = render(self.tokenizer, user_texts, prefixes)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, truncate_prompt_tokens=self.max_length)
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [p + o.outputs[0].text for p, o in zip(prefixes, outputs)]


def make_generator(kind: str, loaded, cfg, stop_when_decided: Callable[[str], bool] | None = None) -> Generator:
    """`hf` or `vllm`, from a LoadedModel and the Config (batch size from cfg.eval)."""
    max_length = cfg.eval.max_length
    if kind == "hf":
        return HFGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size, max_length=max_length,
                           stop_when_decided=stop_when_decided)
    if kind == "vllm":
        return VLLMGenerator(loaded.path, loaded.tokenizer, max_length=max_length,
                             trust_remote_code=cfg.trust_remote_code)
    raise NestuneError(f"unknown generator '{kind}'", "use hf or vllm")
