"""Greedy generation for evaluation: Hugging Face (default) or vLLM, behind one small interface.

    generator.generate(user_texts, prefixes, max_new_tokens) -> completions

Each user text goes through the model's chat template with the generation prompt added; a non-empty
prefix (assistant prefill) is appended to the rendered prompt, and the returned completion starts with
that prefix, so a judge sees the whole answer. `settings` records what decides the outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..errors import NestuneError
from ..models import chat_prompts, input_device, is_out_of_memory
from ..models import position_ids as left_padded_positions

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


def even_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """`order` cut into as few batches as batch_size allows, their sizes within one of each other (240 rows at
    64: four of 60, not three of 64 and one of 48): a decoding step costs nearly as much for a small batch as
    for a full one."""
    n_batches = -(-len(order) // batch_size)
    batches, start = [], 0
    for i in range(n_batches):
        size = len(order) // n_batches + (i < len(order) % n_batches)
        batches.append(order[start : start + size])
        start += size
    return batches


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (less padding; memory errors show early)."""
    return even_batches(sorted(range(len(lengths)), key=lambda i: -lengths[i]), batch_size)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the model's generation config may name several (Qwen: <|im_end|> and <|endoftext|>)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class HFGenerator(Generator):
    """Greedy, batched generation (our loop, equal to transformers' greedy `generate`), left padding. Batches
    group prompts that share a prefix (each prefix computed once per batch), longest first within a group;
    without prefix sharing, batches are length-sorted."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH,
                 stop_when_decided: Callable[[str], bool] | None = None, show_progress: bool = True,
                 share_prefix: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.stop_when_decided = stop_when_decided
        self.show_progress = show_progress
        self.share_prefix = share_prefix  # off only to measure what sharing saves (benchmarks)
        self.settings = {"generator": "hf", "greedy": True, "batch_size": self.batch_size,
                         "max_prompt_tokens": max_length, "early_stop": stop_when_decided is not None,
                         "shared_prefix": share_prefix}

    def with_stop(self, stop_when_decided: Callable[[str], bool] | None) -> HFGenerator:
        """The same generator with another early-stopping rule (or none)."""
        return HFGenerator(self.model, self.tokenizer, self.batch_size, self.max_length, stop_when_decided,
                           self.show_progress, self.share_prefix)

    def generate(self, user_texts: list[str], prefixes: list[str] | None = None,
                 max_new_tokens: int = 64) -> list[str]:
        from tqdm.auto import tqdm

        if not user_texts:
            return []
        prefixes = list(prefixes) if prefixes else [""] * len(user_texts)
        tok = self.tokenizer
        tok.truncation_side = "left"  # over-long prompts keep their end (the generation prompt)
        ids = tok(render(tok, user_texts, prefixes), truncation=True, max_length=self.max_length,
                  add_special_tokens=False)["input_ids"]
        out: list[str] = [""] * len(ids)
        batches = (prefix_sorted_batches(ids, self.batch_size) if self.share_prefix
                   else length_sorted_batches([len(row) for row in ids], self.batch_size))
        with tqdm(total=len(ids), desc="generate", unit="prompt", disable=not self.show_progress,
                  leave=False) as bar:
            for batch in batches:
                texts = self._generate_or_split([ids[i] for i in batch], [prefixes[i] for i in batch],
                                                max_new_tokens)
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.update(len(batch))
        return out

    def _generate_or_split(self, ids: list[list[int]], prefixes: list[str], max_new_tokens: int) -> list[str]:
        """One batch; on out-of-memory, its two halves one after the other (and smaller batches from then on)."""
        try:
            return self._generate_batch(ids, prefixes, max_new_tokens)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            if len(ids) == 1:
                raise NestuneError("generation ran out of memory with one prompt per batch",
                                   "spread the model over devices (--device-map auto), load it in bf16, or "
                                   "lower eval.max_length or eval.max_new_tokens") from None
        from accelerate.utils.memory import clear_device_cache

        clear_device_cache(garbage_collection=True)
        half = len(ids) // 2
        self.batch_size = max(1, min(self.batch_size, half))
        print(f"generate: out of memory at batch size {len(ids)}; retrying with {half}", flush=True)
        return (self._generate_or_split(ids[:half], prefixes[:half], max_new_tokens)
                + self._generate_or_split(ids[half:], prefixes[half:], max_new_tokens))

    @torch.no_grad()
    def _generate_batch(self, ids: list[list[int]], prefixes: list[str], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the last position of every row
        # The rows of a batch share the chat header and, under a jailbreak template, the template text before
        # the request: each such prefix is computed once (DESIGN.md 4: prefill is what evaluation spends its
        # time on), so a batch can mix the rows of several templates and stay full.
        groups = prefix_groups(ids) if self.share_prefix and len(ids) > 1 else None
        prefix = None
        if groups:
            heads = [ids[start][:shared] for start, _, shared in groups]
            head = tok.pad({"input_ids": heads}, padding=True, return_tensors="pt")
            of_row = torch.tensor([g for g, (start, end, _) in enumerate(groups) for _ in range(start, end)])
            ids = [row[shared:] for start, end, shared in groups for row in ids[start:end]]
            prefix = (head["input_ids"], head["attention_mask"], of_row)
        enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        device = input_device(self.model)
        decided = None
        if self.stop_when_decided is not None:
            def decided(row, ids):
                return self.stop_when_decided(prefixes[row] + tok.decode(ids, skip_special_tokens=True))
        new_tokens = greedy_decode(self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                   max_new_tokens, stop_token_ids(self.model, tok) + [tok.pad_token_id], decided,
                                   prefix=None if prefix is None else tuple(t.to(device) for t in prefix))
        return [p + tok.decode(ids, skip_special_tokens=True) for p, ids in zip(prefixes, new_tokens)]


MIN_SHARED_PREFIX = 8  # tokens; a group sharing fewer runs its prompts whole


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(rows: list[list[int]]) -> list[tuple[int, int, int]] | None:
    """Split rows (ordered so that rows with a common prefix are adjacent) into runs that share a token prefix:
    (start, end, shared tokens). Of all such splits, the one that computes the fewest prompt tokens, counting
    each prefix as wide as the longest row: the prefixes run as one left-padded batch, so a 30-token prefix
    beside a 420-token one costs 420 (the plain attack's 24 requests share only the chat header; split into
    groups of requests that begin alike, they cost 23 extra padded prefixes). Each row keeps at least one token
    of its own (the last prompt token's logits choose the first new token). None when sharing saves nothing."""
    n = len(rows)
    lengths = [len(r) for r in rows]
    # Every prefix is padded to the widest one: at most the longest row less its own last token.
    prefix_cost = max(max(lengths) - 1, MIN_SHARED_PREFIX)
    adjacent = [common_prefix_length(rows[i], rows[i + 1]) for i in range(n - 1)]
    cost = [0.0] + [float("inf")] * n  # cost[i]: fewest tokens for rows[:i]
    split: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last run, its shared tokens)
    for end in range(1, n + 1):
        shared, total = lengths[end - 1] - 1, 0
        for start in range(end - 1, -1, -1):
            if start < end - 1:
                shared = min(shared, adjacent[start], lengths[start] - 1)
            total += lengths[start]
            if shared < 1:  # every row from here back differs in its first tokens
                break
            used = shared if shared >= MIN_SHARED_PREFIX else 1
            c = cost[start] + prefix_cost + total - (end - start) * used
            if c < cost[end]:
                cost[end], split[end] = c, (start, used)
    if cost[n] >= sum(lengths):  # also when no split exists (cost inf)
        return None
    groups, end = [], n
    while end > 0:
        start, shared = split[end]
        groups.append((start, end, shared))
        end = start
    return groups[::-1]


def prefix_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of rows that share prefixes: sorted by their tokens (a template's rows sit together),
    the prefix groups widest first and each group's rows longest first, then cut into batches. A batch also
    ends where rows become less than half as long as its longest: every row's cache is as wide as the batch's
    widest prompt, so a 40-token plain request beside a 450-token template would carry ten times its own."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups = prefix_groups([rows[i] for i in order]) or [(0, len(order), 0)]
    runs = [sorted(order[start:end], key=lambda i: -len(rows[i])) for start, end, _ in groups]
    order = [i for run in sorted(runs, key=lambda run: -len(rows[run[0]])) for i in run]
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or 2 * len(rows[order[end]]) < len(rows[order[start]]):
            batches += even_batches(order[start:end], batch_size)
            start = end
    return batches


def cache_kwargs(model, cache, last_logits_only: bool = False) -> dict:
    """Forward kwargs that pass a KV cache: `cache` from transformers 5 on, `past_key_values` before; with
    last_logits_only, logits for the last position only where the model supports it."""
    accepts = inspect.signature(model.forward).parameters
    extra = {"cache" if "cache" in accepts else "past_key_values": cache}
    if last_logits_only and "logits_to_keep" in accepts:
        extra["logits_to_keep"] = 1
    return extra


def preallocated_cache(model, room: int):
    """transformers' DynamicCache, whose full-attention layers write new keys and values into spare room
    (`room` tokens, grown as needed) instead of concatenating: concatenation copies every row's whole cache in
    every layer at every step (about a gigabyte per step at 64 rows of 200-450-token prompts on smollm2).
    Sliding-window and other special layers are left as transformers makes them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = None
            n, q = self.get_seq_length(), key_states.shape[-2]
            if self.buffers is None or n + q > self.buffers[0].shape[-2]:
                grown = []
                for old, new in ((self.keys, key_states), (self.values, value_states)):
                    shape = (*new.shape[:-2], n + q + room, new.shape[-1])
                    buffer = new.new_empty(shape)
                    if n:
                        buffer[..., :n, :] = old
                    grown.append(buffer)
                self.buffers = grown
            self.buffers[0][..., n:n + q, :] = key_states
            self.buffers[1][..., n:n + q, :] = value_states
            self.keys, self.values = (b[..., :n + q, :] for b in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized and self.buffers is not None:
                n = self.get_seq_length()
                self.buffers = [b[indices] for b in self.buffers]
                self.keys, self.values = (b[..., :n, :] for b in self.buffers)

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("greedy_decode never crops its cache")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("greedy_decode never repeats its cache")

    cache = DynamicCache(config=model.config)
    if cache.layers:
        cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    elif getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = PreallocatedLayer
    return cache


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  stop_ids: list[int], decided: Callable[[int, list[int]], bool] | None = None,
                  prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; returns each row's new tokens (without the end token).

    With `prefix` = (prefix_ids, prefix_mask, prefix_of_row): left-padded prefixes, one per group of rows, and
    each row's group; row i's prompt is prefix_ids[prefix_of_row[i]] followed by input_ids[i]. The prefixes run
    once and each one's KV cache is copied to its rows, so padding also sits between prefix and row, masked out.

    Unlike `model.generate`, rows that end (an end-of-turn token, or `decided(row, new_ids)` is True) leave the
    batch and the KV cache, once an eighth of the batch has ended, so later steps compute only the rows still
    going: the hardened model's refusals end after a few tokens and soon stop costing anything. Outputs equal
    `generate`'s greedy ones.
    """
    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return out
    stops = set(stop_ids)
    alive = torch.arange(n, device=input_ids.device)  # the original row of each row still in the batch
    cache = preallocated_cache(model, room=max_new_tokens)
    extra = cache_kwargs(model, cache, last_logits_only=True)
    if prefix is not None:
        prefix_ids, prefix_mask, prefix_of_row = prefix
        model(input_ids=prefix_ids, attention_mask=prefix_mask,
              position_ids=left_padded_positions(prefix_mask), use_cache=True, **extra)
        cache.batch_select_indices(prefix_of_row)
        attention_mask = torch.cat([prefix_mask[prefix_of_row], attention_mask], dim=-1)
    # Left padding: positions count real tokens only, as `generate` computes them.
    position_ids = left_padded_positions(attention_mask)[:, -input_ids.shape[1]:]
    ids = input_ids
    going = list(range(n))  # the batch positions of the rows still going; the others have ended
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                       **extra).logits[:, -1]
        next_ids = logits.argmax(-1)
        rows, tokens = alive.tolist(), next_ids.tolist()
        keep = []
        for j in going:
            if tokens[j] in stops:
                continue
            out[rows[j]].append(tokens[j])
            if decided is None or not decided(rows[j], out[rows[j]]):
                keep.append(j)
        going = keep
        if not keep or step == max_new_tokens - 1:
            break
        # Ended rows leave in groups of an eighth of the batch: leaving copies every remaining row's cache, which
        # at 216 rows of 450 tokens costs more than computing a few ended rows a few more steps.
        if len(alive) - len(keep) >= max(1, len(alive) // 8):
            going = list(range(len(keep)))
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            alive, next_ids = alive[index], next_ids[index]
            attention_mask, position_ids = attention_mask[index], position_ids[index]
        ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return out


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
                         "max_prompt_tokens": max_length, "early_stop": False,
                         "shared_prefix": "vllm prefix caching"}

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
