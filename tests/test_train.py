"""The training objective on padded batches equals the same objective on each example alone."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from nestune.config import Config
from nestune.testing import TINY_ARCHS, tiny_model
from nestune.train import Example, collate, logits_width, response_loss


def examples() -> list[Example]:
    # Prompts and responses of different lengths, so padding, and response starts, differ per row.
    shapes = [(5, 3, False), (2, 6, True), (9, 1, False), (4, 4, True)]
    out = []
    for i, (n_prompt, n_response, benign) in enumerate(shapes):
        ids = [(7 * i + 3 * j) % 90 + 5 for j in range(n_prompt + n_response)]
        out.append(Example(ids, [-100] * n_prompt + ids[n_prompt:], benign))
    return out


def loss_alone(model, example: Example) -> torch.Tensor:
    """Cross-entropy of one unpadded example with the logits of every position."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
    labels = torch.tensor(example.labels[1:])
    keep = labels != -100
    return F.cross_entropy(logits[keep].float(), labels[keep])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch_loss_equals_the_mean_of_each_example_alone(arch):
    model = tiny_model(arch).eval()
    cfg = Config()
    cfg.train.benign_weight = 0.5
    batch = collate(examples(), pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        got = response_loss(model, batch, cfg)
        alone = torch.stack([loss_alone(model, e) for e in examples()])
    weights = torch.tensor([0.5 if e.benign else 1.0 for e in examples()])
    expected = (alone * weights).sum() / weights.sum()
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kl_benign_loss_equals_each_example_alone(arch):
    # Benign rows: KL(original || model) on their answer tokens; harmful rows: cross-entropy. The original
    # runs on the benign rows only; the result must equal computing every example on its own.
    model = tiny_model(arch).eval()
    cfg = Config()
    cfg.train.benign_loss = "kl"
    head = model.get_output_embeddings().weight
    original = head.detach().clone() * 0.5  # "the original model": a different LM head

    @contextlib.contextmanager
    def reference():
        saved = head.data.clone()
        head.data.copy_(original)
        try:
            yield
        finally:
            head.data.copy_(saved)

    def alone(e: Example) -> torch.Tensor:
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor(e.labels[1:])
        keep = labels != -100
        logits = model(input_ids=ids).logits[0, :-1][keep].float()
        if not e.benign:
            return F.cross_entropy(logits, labels[keep])
        with reference():
            ref = model(input_ids=ids).logits[0, :-1][keep].float()
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                        reduction="none").sum(-1).mean()

    batch = collate(examples(), pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        got = response_loss(model, batch, cfg, reference=reference)
        expected = torch.stack([alone(e) for e in examples()]).mean()
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert expected > 0


def test_logits_cover_the_longest_response_and_one_position_before_it():
    batch = collate(examples(), pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].shape[1] == 10
    assert logits_width(batch) == 6 + 1  # the 6-token response, predicted from its last prompt token on
    nothing = {"labels": torch.full((2, 4), -100)}
    assert logits_width(nothing) == 1
