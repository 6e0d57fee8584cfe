"""Bootstrap intervals, multiple-choice scoring, GSM8K answer extraction, next-token KL."""

from dataclasses import dataclass

import pytest
import torch

from nestune.errors import NestuneError
from nestune.evaluate.metrics import accuracy, bootstrap_ci, outcome_changes, paired_change, rate
from nestune.evaluate.utility import (
    continuation_logprobs,
    extract_answer,
    gsm8k_correct,
    kl,
    mc_accuracy,
    mc_predictions,
    mc_prompt,
    next_token_logprobs,
)
from nestune.testing import TINY_ARCHS, tiny_model, tiny_tokenizer

# ---------------------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_contains_mean_and_is_deterministic():
    values = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    mean, lo, hi = bootstrap_ci(values, 500, seed=3)
    assert mean == pytest.approx(0.6) and lo <= mean <= hi and 0 <= lo < hi <= 1
    assert bootstrap_ci(values, 500, seed=3) == (mean, lo, hi)


def test_bootstrap_narrows_with_n():
    small = [1, 0] * 10
    large = [1, 0] * 500
    _, lo_s, hi_s = bootstrap_ci(small, 1000, seed=0)
    _, lo_l, hi_l = bootstrap_ci(large, 1000, seed=0)
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_rate_dicts():
    r = rate([True, False, True, True], 200, 0)
    assert set(r) == {"rate", "ci", "n"} and r["rate"] == 0.75 and r["n"] == 4
    a = accuracy([True], 200, 0)
    assert a == {"acc": 1.0, "ci": [1.0, 1.0], "n": 1}


def test_paired_change_counts_only_items_both_sides_scored():
    change = paired_change({"a": 1, "b": 1, "c": 0, "d": 0}, {"a": 0, "b": 1, "c": 0, "d": 1, "e": 1}, 200, 0)
    assert change["change"] == 0.0 and change["n"] == 4  # -1, 0, 0, +1; "e" has no before
    assert change["ci"][0] < 0 < change["ci"][1]
    assert paired_change({"a": 1}, {"b": 1}) is None


def test_paired_interval_sees_a_change_the_two_rates_intervals_cannot():
    # 40 items; 6 of the 20 solved ones are lost and nothing else moves: 50% -> 35%.
    before = {str(i): int(i < 20) for i in range(40)}
    after = {str(i): int(i < 14) for i in range(40)}
    r_before, r_after = rate(before.values(), 1000, 0), rate(after.values(), 1000, 0)
    assert r_after["ci"][1] > r_before["ci"][0]  # the intervals overlap: unpaired, no verdict
    change = paired_change(before, after, 1000, 0)
    assert change["change"] == pytest.approx(-0.15) and change["ci"][1] < 0


def test_outcome_changes_pair_behaviours_on_the_attacks_both_sides_ran():
    before = {"attacks": {"x/1": {"none": 1, "aim": 1, "dan": 1}, "x/2": {"none": 0, "aim": 1, "dan": 0}},
              "overrefusal": {"o/1": 0, "o/2": 0}, "utility": {"arc-easy": {"q1": 1, "q2": 0}}, "gsm8k": {}}
    after = {"attacks": {"x/1": {"none": 0, "aim": 1}, "x/2": {"none": 0, "aim": 0}},
             "overrefusal": {"o/1": 1, "o/2": 0}, "utility": {"arc-easy": {"q1": 1, "q2": 1}}, "gsm8k": {}}
    c = outcome_changes(before, after, 200, 0)
    assert set(c["asr_by_attack"]) == {"none", "aim"}  # dan ran before only
    assert c["asr_by_attack"]["none"]["change"] == -0.5 and c["asr_by_attack"]["aim"]["change"] == -0.5
    assert c["asr_mean"]["change"] == pytest.approx(((0.5 - 1) + (0 - 0.5)) / 2) and c["asr_mean"]["n"] == 2
    assert c["asr_any_attack"]["change"] == pytest.approx(-0.5)  # x/2 broken by aim before, by nothing after
    assert c["overrefusal"]["change"] == 0.5 and c["utility"]["arc-easy"]["change"] == 0.5
    assert c["gsm8k"] is None
    assert c["asr_by_source"] == {}  # these outcomes name no behaviour sets


def test_outcome_changes_pair_each_behaviour_sets_mean():
    sources = {"a/1": "a", "b/1": "b", "b/2": "b"}
    before = {"attacks": {"a/1": {"none": 1}, "b/1": {"none": 1}, "b/2": {"none": 1}}, "attack_sources": sources}
    after = {"attacks": {"a/1": {"none": 0}, "b/1": {"none": 1}, "b/2": {"none": 0}}, "attack_sources": sources}
    c = outcome_changes(before, after, 200, 0)
    assert c["asr_by_source"]["a"]["change"] == -1 and c["asr_by_source"]["a"]["n"] == 1
    assert c["asr_by_source"]["b"]["change"] == -0.5 and c["asr_by_source"]["b"]["n"] == 2


# ---------------------------------------------------------------------------------------------------------
# Multiple choice


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple
    answer: int
    id: str = "0"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2)


@pytest.fixture()
def tok():
    return tiny_tokenizer()


def direct_logprob(model, tok, context, continuation):
    """log p(continuation | context) from one unpadded forward pass."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(lp[len(ctx) - 1 + k, cont[k]].item() for k in range(len(cont)))


def test_continuation_scores_match_direct_computation(model, tok):
    # Choices of very different token lengths share a batch.
    requests = [(mc_prompt("What is 2+2?"), " 4"), (mc_prompt("What is 2+2?"), " four, as everyone knows"),
                (mc_prompt("Name a colour, please, any colour at all"), " red"), ("Q", " a")]
    got = continuation_logprobs(model, tok, requests, batch_size=3)
    want = [direct_logprob(model, tok, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=1e-4)


def test_mc_accuracy_with_planted_answers(model, tok):
    questions = ["What is 2+2?", "Which is a fruit?", "Pick one"]
    choices = [("4", "five", "a very long wrong answer here"), ("apple", "car"), ("x", "yy", "zzz", "w")]
    scores = [[direct_logprob(model, tok, mc_prompt(q), " " + c) for c in cs] for q, cs in zip(questions, choices)]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    right = [Item(q, cs, b, str(i)) for i, (q, cs, b) in enumerate(zip(questions, choices, best))]
    wrong = [Item(q, cs, (b + 1) % len(cs), str(i)) for i, (q, cs, b) in enumerate(zip(questions, choices, best))]
    assert mc_predictions(model, tok, right, batch_size=2) == best
    assert mc_accuracy(model, tok, right, n_boot=100)["acc"] == 1.0
    assert mc_accuracy(model, tok, wrong, n_boot=100)["acc"] == 0.0
    assert mc_accuracy(model, tok, [], n_boot=100)["n"] == 0


# ---------------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("response,number", [
    ("First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", 14),
    ("She pays $1,250 in total.\n#### 1,250", 1250),
    ("So 12 apples minus 5 leaves 7 apples", 7),
    ("The answer is -3.5", -3.5),
    ("The answer is 18. Check: 9 + 9 = 18, and 2 * 3 = 6", 18),
    ("no numbers at all", None),
])
def test_extract_answer(response, number):
    assert extract_answer(response) == number


def test_gsm8k_correct():
    assert gsm8k_correct("The answer is 1,000.", "1000")
    assert not gsm8k_correct("The answer is 999.", "1000")
    assert not gsm8k_correct("I don't know", "5")


# ---------------------------------------------------------------------------------------------------------
# KL


def test_kl_self_zero_and_perturbed_positive(model, tok):
    texts = ["What is the capital of France?", "How do plants grow?", "Tell me a joke"]
    base = next_token_logprobs(model, tok, texts, batch_size=2)
    assert base.shape == (3, model.config.vocab_size)
    assert torch.allclose(base.exp().sum(-1), torch.ones(3), atol=1e-4)
    again = next_token_logprobs(model, tok, texts, batch_size=3)  # other padding, same distributions
    assert kl(base, again) == pytest.approx(0.0, abs=1e-5)
    assert kl(base, base) == 0.0

    other = tiny_model("llama", seed=2)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.5 * torch.randn_like(other.model.layers[0].mlp.up_proj.weight))
    assert kl(base, next_token_logprobs(other, tok, texts)) > 1e-4


def test_kl_shape_mismatch():
    with pytest.raises(NestuneError):
        kl(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_continuation_scores_with_shared_contexts_on_every_architecture(arch):
    # Questions with 1 to 4 choices of different lengths; batches of 3 continuations hold whole questions, so
    # batch boundaries fall between questions of different sizes.
    m, t = tiny_model(arch, seed=3), tiny_tokenizer()
    questions = [("What is 2+2?", [" 4", " four, as everyone knows", " 5"]), ("Q", [" a"]),
                 ("Name a colour, please, any colour at all", [" red", " blue", " a shade of green", " no"])]
    requests = [(mc_prompt(q), c) for q, choices in questions for c in choices]
    got = continuation_logprobs(m, t, requests, batch_size=3)
    want = [direct_logprob(m, t, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=1e-4)


def test_long_context_is_cut_from_the_left(model, tok):
    context, choices = mc_prompt("word " * 40), [" yes", " no, not at all"]
    got = continuation_logprobs(model, tok, [(context, c) for c in choices], batch_size=4, max_length=16)
    ctx = tok(context)["input_ids"][-(16 - len(tok(choices[1], add_special_tokens=False)["input_ids"])):]
    for score, choice in zip(got, choices):
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        assert score == pytest.approx(sum(lp[len(ctx) - 1 + k, cont[k]].item() for k in range(len(cont))), abs=1e-4)
