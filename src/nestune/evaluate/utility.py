"""Utility: does the hardened model still know and reason what the base model did?

- Multiple-choice accuracy (ARC-Easy, ARC-Challenge, MMLU) by log-likelihood, one scoring path for every
  task, as lm-evaluation-harness does: the prompt is plain text, not the chat template,
  "Question: <question>\\nAnswer:", each choice is the continuation " <choice text>", and the prediction
  is the choice with the highest summed log-probability (lm-eval's `acc`; no length normalisation).
  Plain text keeps the numbers comparable with published base-model figures and across chat templates.
- GSM8K exact match: greedy chat generation with a small budget; the answer is the number after
  "answer is" / "####" if the model writes one, else the last number in the response.
- Benign next-token KL: `next_token_logprobs` is computed once per model (base, hardened; or one model with
  an adapter disabled and enabled) and saved; `kl(base, new)` is the mean KL(base || new) at the generation
  position of chat-rendered benign prompts.
"""

from __future__ import annotations

import re

import torch

from ..errors import NestuneError
from ..models import encode_chat, input_device, position_ids
from .metrics import accuracy

# ---------------------------------------------------------------------------------------------------------
# Multiple choice


def mc_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mc_requests(items) -> list[tuple[int, int, str, str]]:
    """(item index, choice index, context, continuation) for every choice of every item."""
    return [(i, j, mc_prompt(item.question), " " + str(choice).strip())
            for i, item in enumerate(items) for j, choice in enumerate(item.choices)]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                          max_length: int = 1024) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation).

    The choices of a question share its context, so each distinct context runs once (left-padded), its KV
    cache is copied to every continuation of it, and the continuations run on top (right-padded): a question
    costs its context once plus its choices, not its context once per choice. A batch holds whole questions,
    about `batch_size` continuations. Context and continuation are tokenized apart (BOS on the context where
    the model expects one); a context longer than max_length minus its longest continuation is cut from the
    left.
    """
    from transformers import DynamicCache

    from .generate import cache_kwargs

    conts = [tokenizer(x, add_special_tokens=False)["input_ids"][-(max_length - 1):] for _, x in requests]
    groups: dict[str, list[int]] = {}
    for r, (context, _) in enumerate(requests):
        groups.setdefault(context, []).append(r)
    contexts = []
    for context, members in groups.items():
        room = max_length - max(len(conts[r]) for r in members)
        contexts.append((tokenizer(context, add_special_tokens=True)["input_ids"][-room:], members))
    contexts.sort(key=lambda c: -len(c[0]))  # longest first: less padding, and memory errors show early
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    scores = [0.0] * len(requests)
    start = 0
    while start < len(contexts):
        end, rows = start, 0
        while end < len(contexts) and (rows == 0 or rows + len(contexts[end][1]) <= batch_size):
            rows += len(contexts[end][1])
            end += 1
        batch, start = contexts[start:end], end
        cache = DynamicCache(config=model.config)
        # 1. The contexts, left-padded; the last position's logits score each continuation's first token.
        width = max(len(ids) for ids, _ in batch)
        ctx = torch.full((len(batch), width), pad, dtype=torch.long)
        ctx_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for g, (ids, _) in enumerate(batch):
            ctx[g, width - len(ids):] = torch.tensor(ids)
            ctx_mask[g, width - len(ids):] = 1
        ctx, ctx_mask = ctx.to(device), ctx_mask.to(device)
        out = model(input_ids=ctx, attention_mask=ctx_mask, position_ids=position_ids(ctx_mask), use_cache=True,
                    **cache_kwargs(model, cache, last_logits_only=True))
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        # 2. Each context's cache copied to each of its continuations, which run right-padded after it.
        members = [(g, r) for g, (_, rs) in enumerate(batch) for r in rs]
        index = torch.tensor([g for g, _ in members], device=device)
        cache.batch_select_indices(index)
        cont_width = max(len(conts[r]) for _, r in members)
        cont = torch.full((len(members), cont_width), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(members), cont_width), dtype=torch.long)
        for row, (_, r) in enumerate(members):
            cont[row, :len(conts[r])] = torch.tensor(conts[r])
            cont_mask[row, :len(conts[r])] = 1
        cont, cont_mask = cont.to(device), cont_mask.to(device)
        positions = ctx_mask.sum(-1)[index, None] + torch.arange(cont_width, device=device)
        logits = model(input_ids=cont, attention_mask=torch.cat([ctx_mask[index], cont_mask], dim=-1),
                       position_ids=positions, use_cache=True, **cache_kwargs(model, cache)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (g, r) in enumerate(members):
            ids = conts[r]
            # Position t of the continuation predicts its token t + 1.
            rest = logprobs[row, : len(ids) - 1].gather(-1, cont[row, 1 : len(ids), None]).sum()
            scores[r] = float(first[g, ids[0]] + rest)
    return scores


def mc_predictions(model, tokenizer, items, batch_size: int = 8) -> list[int]:
    """The index of the highest-scoring choice for each item."""
    requests = mc_requests(items)
    scores = continuation_logprobs(model, tokenizer, [(c, x) for _, _, c, x in requests], batch_size)
    best: dict[int, tuple[float, int]] = {}
    for (i, j, _, _), s in zip(requests, scores):
        if i not in best or s > best[i][0]:
            best[i] = (s, j)
    return [best[i][1] for i in range(len(items))]


def mc_accuracy(model, tokenizer, items, batch_size: int = 8, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"acc", "ci", "n"} for a list of MCItem-like records (question, choices, answer index)."""
    if not items:
        return {"acc": float("nan"), "ci": [float("nan"), float("nan")], "n": 0}
    predicted = mc_predictions(model, tokenizer, items, batch_size)
    return accuracy([p == int(item.answer) for p, item in zip(predicted, items)], n_boot, seed)


# ---------------------------------------------------------------------------------------------------------
# GSM8K

GSM8K_INSTRUCTION = "{question}\nSolve the problem step by step, then end with \"The answer is <number>.\""
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        return None


def extract_answer(response: str) -> float | None:
    """The stated final answer ("The answer is 42", "#### 42"), else the last number in the response."""
    stated = re.findall(rf"(?:answer is|####)\s*:?\s*({NUMBER})", response, flags=re.IGNORECASE)
    numbers = stated or re.findall(NUMBER, response)
    return _to_number(numbers[-1]) if numbers else None


def gsm8k_correct(response: str, target: str) -> bool:
    got, want = extract_answer(response), _to_number(str(target))
    return got is not None and want is not None and abs(got - want) < 1e-6


def gsm8k_prompts(items) -> list[str]:
    return [GSM8K_INSTRUCTION.format(question=item.text) for item in items]


# ---------------------------------------------------------------------------------------------------------
# Benign next-token KL


@torch.no_grad()
def next_token_logprobs(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 512) -> torch.Tensor:
    """(n, vocab) float32 log-probabilities of the first answer token of each chat-rendered prompt."""
    device = input_device(model)
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = encode_chat(tokenizer, texts[start : start + batch_size], max_length, device=device)
        mask = enc["attention_mask"]
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids(mask),
                       logits_to_keep=1).logits[:, -1].float()
        rows.append(torch.log_softmax(logits, dim=-1).cpu())
    if not rows:
        return torch.empty(0, 0)
    return torch.cat(rows)


def kl(base_logprobs: torch.Tensor, new_logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(base || new) = sum_v p_base(v) (log p_base(v) - log p_new(v))."""
    if base_logprobs.shape != new_logprobs.shape:
        raise NestuneError(
            f"next-token log-probabilities differ in shape ({tuple(base_logprobs.shape)} vs "
            f"{tuple(new_logprobs.shape)})",
            "compare two evaluations of the same model family on the same benign prompts",
        )
    if base_logprobs.numel() == 0:
        return float("nan")
    a, b = base_logprobs.double(), new_logprobs.double()
    p = a.exp()
    terms = torch.where(p > 0, p * (a - b), torch.zeros_like(p))  # 0 * log 0 is 0, not nan
    return max(0.0, float(terms.sum(-1).mean()))  # KL >= 0; float noise can dip a hair below


def benign_kl(base_model, new_model, tokenizer, texts: list[str], batch_size: int = 8) -> float:
    """KL(base || new) on benign prompts; for an adapter pass the same model before and after attaching it."""
    return kl(next_token_logprobs(base_model, tokenizer, texts, batch_size),
              next_token_logprobs(new_model, tokenizer, texts, batch_size))
