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


def down_proj_only():
    """A tiny llama (seed 0) whose last layer's down projection is the only trainable tensor."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    weight = model.model.layers[-1].mlp.down_proj.weight
    weight.requires_grad_(True)
    return model, weight


def small_run(tmp_path, schedule: str, loss_fn=None):
    """train_loop on down_proj_only's model."""
    from nestune.train import train_loop

    model, weight = down_proj_only()
    cfg = Config()
    cfg.train.lr, cfg.train.lr_schedule, cfg.train.batch_size = 1e-2, schedule, 2
    cfg.train.epochs = 2  # of 2 steps each
    stats = train_loop(model, {"w": weight}, examples(), cfg, tmp_path, loss_fn=loss_fn)
    return weight.detach().clone(), stats


@pytest.mark.parametrize("schedule,expected", [("constant", [1, 1, 1, 1]), ("linear", [1, 0.75, 0.5, 0.25]),
                                               ("cosine", [1, 0.853553, 0.5, 0.146447])])
def test_lr_schedule_sets_each_steps_lr(schedule, expected, tmp_path, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    small_run(tmp_path, schedule)
    assert seen == pytest.approx([1e-2 * f for f in expected], rel=1e-5)


def test_decaying_lr_resumes_exactly_after_a_crash(tmp_path):
    # The schedule depends on the step alone, so a run that dies after its first epoch's checkpoint and is
    # started again ends with the same weights as one that never stopped.
    whole, _ = small_run(tmp_path / "whole", "linear")
    calls = {"n": 0}

    def dies_in_the_second_epoch(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return response_loss(model, batch, Config())

    with pytest.raises(RuntimeError, match="killed"):
        small_run(tmp_path / "resumed", "linear", loss_fn=dies_in_the_second_epoch)
    resumed, stats = small_run(tmp_path / "resumed", "linear")
    assert stats["steps"] == 4
    assert torch.equal(whole, resumed)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_batches_hold_every_example_once(group_by_length):
    import random

    from nestune.train import epoch_batches

    lengths = [random.Random(i).randint(5, 120) for i in range(101)]
    batches = epoch_batches(lengths, 8, group_by_length, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert len(batches) == 13 and sorted(len(b) for b in batches)[1:] == [8] * 12
    assert batches == epoch_batches(lengths, 8, group_by_length, random.Random(0))  # resumable: rng decides
    assert batches != epoch_batches(lengths, 8, group_by_length, random.Random(1))


def test_grouping_by_length_cuts_padding():
    import random

    from nestune.train import epoch_batches

    lengths = [random.Random(i).randint(40, 130) for i in range(192)]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = padded(epoch_batches(lengths, 8, False, random.Random(0)))
    grouped = padded(epoch_batches(lengths, 8, True, random.Random(0)))
    assert grouped < 0.9 * plain and grouped >= sum(lengths)


def test_length_parts_cut_a_batch_where_padding_costs_more_than_a_forward():
    from nestune.train import length_parts

    lengths = [100, 10, 12, 98, 11, 101, 9, 99]
    # one part: 8 x 101 + 64 = 872 tokens' worth; short and long apart: 4 x 12 + 64 + 4 x 101 + 64 = 580
    assert length_parts(lengths, overhead=64) == [[6, 1, 4, 2], [3, 7, 0, 5]]
    assert length_parts(lengths, overhead=10_000) == [[6, 1, 4, 2, 3, 7, 0, 5]]  # a forward dearer than padding
    assert length_parts(lengths, overhead=0) == [[i] for i in [6, 1, 4, 2, 3, 7, 0, 5]]
    assert length_parts([50, 50, 50]) == [[0, 1, 2]]


def test_length_split_batches_make_the_update_of_whole_batches(tmp_path):
    # Two short and two long examples per batch of 4: split, they run as two forwards, each loss weighted by
    # its share of the batch's loss weights (benign rows weigh 2 here); the weights after two steps must be
    # those of training on the whole padded batches.
    from nestune.train import train_loop

    rows = []
    # the short part is harmful, the long one benign: their loss weights differ from their example counts
    for i, (n_prompt, n_response, benign) in enumerate([(3, 2, False), (120, 30, True), (2, 3, False),
                                                          (110, 25, True)] * 2):
        ids = [(7 * i + 3 * j) % 90 + 5 for j in range(n_prompt + n_response)]
        rows.append(Example(ids, [-100] * n_prompt + ids[n_prompt:], benign))

    def trained(split: bool):
        model, weight = down_proj_only()
        start = weight.detach().clone()
        cfg = Config()
        cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.benign_weight = 1e-2, 4, 1, 2.0
        cfg.train.split_by_length = split
        forwards = []

        def loss_fn(m, batch):
            forwards.append(batch["input_ids"].shape)
            return response_loss(m, batch, cfg)

        stats = train_loop(model, {"w": weight}, rows, cfg, tmp_path / str(split), loss_fn=loss_fn)
        return weight.detach().clone(), stats, forwards, start

    whole, whole_stats, whole_forwards, start = trained(False)
    split, split_stats, split_forwards, _ = trained(True)
    assert len(whole_forwards) == 2 and len(split_forwards) == 4
    assert sum(r * w for r, w in split_forwards) < 0.6 * sum(r * w for r, w in whole_forwards)
    assert (whole - start).abs().max() > 1e-3  # training moved the weights
    assert torch.allclose(split, whole, atol=1e-6, rtol=1e-5)
    assert split_stats["losses"] == pytest.approx(whole_stats["losses"], rel=1e-5)
