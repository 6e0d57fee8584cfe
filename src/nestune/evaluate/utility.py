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
from ..models import encode_chat, input_device
from .metrics import accuracy

# ---------------------------------------------------------------------------------------------------------
# Multiple choice


def mc_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def mc_requests(items) -> list[tuple[int, int, str, str]]:
    """(item index, choice index, context, continuation) for every choice of every item."""
    return [(i, j, mc_prompt(item.question), " " + str(choice).strip())
            for i, item in enumerate(items) for j, choice in enumerate(item.choices)]


def _tokenize_request(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context + continuation and the continuation's length; the context is cut from the left."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]  # BOS where the model expects one
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = (ctx + cont)[-max_length:]
    return ids, min(len(cont), len(ids) - 1)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token of each left-padded row (as `generate` computes)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                          max_length: int = 1024) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation).

    Rows are left-padded so every continuation ends at the last position, and only the last positions'
    logits are computed (`logits_to_keep`): the full (batch, length, vocab) tensor is never built.
    """
    encoded = [_tokenize_request(tokenizer, c, x, max_length) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in batch)
        keep = max(encoded[i][1] for i in batch) + 1
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = encoded[i][0]
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                       logits_to_keep=keep).logits[:, -keep:].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            n = encoded[i][1]
            targets = ids[row, width - n :]
            # The logit at position t predicts token t+1: the last n tokens are read from the n positions
            # before the final one.
            preds = logprobs[row, keep - 1 - n : keep - 1]
            scores[i] = float(preds.gather(-1, targets.unsqueeze(-1)).sum())
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
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids_for(mask),
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
