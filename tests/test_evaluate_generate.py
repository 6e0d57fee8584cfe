"""Generation: batched greedy equals one-by-one greedy, prefill, per-row early stopping."""

import pytest

from nestune.errors import NestuneError
from nestune.evaluate.generate import (
    HFGenerator,
    even_batches,
    greedy_decode,
    length_sorted_batches,
    make_generator,
    preallocated_cache,
    stop_token_ids,
)
from nestune.testing import TINY_ARCHS, tiny_model, tiny_tokenizer

ALIKE = ["tell me more", "mid length", "say a thing", "what is it"]  # one batch: none is half as long as another
TEXTS = ["hi", "a much longer prompt with several words in it", "mid length", "x" * 40, "q", "tell me more"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=1)


@pytest.fixture()
def tok():
    return tiny_tokenizer()


def test_length_sorted_batches_cover_every_index_once():
    batches = length_sorted_batches([3, 9, 1, 7, 5], 2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert batches[0] == [1, 3]  # longest first


def test_even_batches_are_as_few_as_the_size_allows_and_equal():
    assert [len(b) for b in even_batches(list(range(240)), 64)] == [60, 60, 60, 60]
    assert [len(b) for b in even_batches(list(range(240)), 256)] == [240]
    assert [len(b) for b in even_batches(list(range(7)), 3)] == [3, 2, 2]
    assert even_batches([], 8) == []
    assert [i for b in even_batches(list(range(130)), 64) for i in b] == list(range(130))


def test_batched_equals_unbatched(model, tok):
    batched = HFGenerator(model, tok, batch_size=4, show_progress=False).generate(TEXTS, max_new_tokens=10)
    single = [HFGenerator(model, tok, batch_size=1, show_progress=False).generate([t], max_new_tokens=10)[0]
              for t in TEXTS]
    assert batched == single
    assert len(set(batched)) > 1  # outputs differ by prompt, so a lost order would show


def test_prefill_prefix_is_kept_and_continued(model, tok):
    gen = HFGenerator(model, tok, batch_size=3, show_progress=False)
    out = gen.generate(TEXTS[:3], ["Sure, here is", "", "Absolutely:"], max_new_tokens=6)
    assert out[0].startswith("Sure, here is") and out[2].startswith("Absolutely:")
    # The prefix conditions the continuation: it differs from the plain answer.
    plain = gen.generate([TEXTS[0]], max_new_tokens=6)[0]
    assert out[0][len("Sure, here is"):] != plain


def test_early_stop_is_per_row(model, tok):
    full = HFGenerator(model, tok, batch_size=2, show_progress=False).generate(TEXTS[:2], ["STOP", "go"], 12)
    seen = []

    def decided(text):
        seen.append(text)
        return text.startswith("STOP")

    gen = HFGenerator(model, tok, batch_size=2, stop_when_decided=decided, show_progress=False)
    out = gen.generate(TEXTS[:2], ["STOP", "go"], 12)
    assert seen, "the rule was never consulted"
    one_token = HFGenerator(model, tok, show_progress=False).generate(TEXTS[:1], ["STOP"], 1)
    assert out[0] == one_token[0] != full[0]  # stopped after its first token
    assert out[1] == full[1]  # the other row ran to its end unchanged
    assert gen.settings["early_stop"] and gen.settings["greedy"]


def test_make_generator_kinds(model, tok):
    from types import SimpleNamespace

    from nestune.config import Config

    loaded = SimpleNamespace(model=model, tokenizer=tok, path="unused")
    cfg = Config()
    assert isinstance(make_generator("hf", loaded, cfg), HFGenerator)
    with pytest.raises(NestuneError):
        make_generator("nosuch", loaded, cfg)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(NestuneError) as err:
            make_generator("vllm", loaded, cfg)
        assert "vllm" in err.value.fix.lower()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_decode_equals_transformers_generate(arch, tok):
    from transformers import GenerationConfig

    from nestune.models import chat_prompts

    model = tiny_model(arch, seed=1)
    tok.padding_side = "left"
    enc = tok(chat_prompts(tok, TEXTS), return_tensors="pt", padding=True, add_special_tokens=False)
    stops = stop_token_ids(model, tok) + [tok.pad_token_id]
    config = GenerationConfig(do_sample=False, max_new_tokens=12, num_beams=1, pad_token_id=tok.pad_token_id,
                              eos_token_id=stops)
    reference = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:].tolist()
    reference = [next((row[:i] for i, t in enumerate(row) if t in stops), row) for row in reference]
    assert greedy_decode(model, enc["input_ids"], enc["attention_mask"], 12, stops) == reference
    assert sum(len(r) for r in reference) >= len(TEXTS)  # the rows produced tokens to compare


def test_rows_that_are_decided_leave_the_batch(model, tok):
    rows_per_pass = []
    handle = model.register_forward_hook(lambda m, a, kw, out: rows_per_pass.append(kw["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        gen = HFGenerator(model, tok, batch_size=4, show_progress=False,
                          stop_when_decided=lambda text: text.startswith("STOP"))
        out = gen.generate(ALIKE, ["STOP", "go", "STOP", "go"], 10)
    finally:
        handle.remove()
    full = HFGenerator(model, tok, batch_size=4, show_progress=False).generate(ALIKE, ["", "go", "", "go"], 10)
    assert out[1] == full[1] and out[3] == full[3]  # the rows still going are unchanged by the others leaving
    assert rows_per_pass[0] == 4 and rows_per_pass[1] == 2  # the two decided rows left after the first pass


def test_ended_rows_leave_a_large_batch_in_groups_of_an_eighth(model, tok):
    texts = [f"{t} number {i}" for i in range(3) for t in TEXTS][:16]

    def passes(prefixes):
        rows_per_pass = []
        handle = model.register_forward_hook(lambda m, a, kw, out: rows_per_pass.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
        try:
            gen = HFGenerator(model, tok, batch_size=16, show_progress=False, share_prefix=False,
                              stop_when_decided=lambda text: text.startswith("STOP"))
            out = gen.generate(texts, prefixes, 6)
        finally:
            handle.remove()
        return out, rows_per_pass

    one, one_passes = passes(["STOP"] + ["go"] * 15)
    two, two_passes = passes(["STOP", "STOP"] + ["go"] * 14)
    assert one_passes == [16] * 6  # one ended row of 16 stays (computed, ignored) ...
    assert two_passes == [16] + [14] * 5  # ... two (an eighth) leave together
    full = HFGenerator(model, tok, batch_size=16, show_progress=False).generate(texts, ["go"] * 16, 6)
    assert one[1:] == full[1:] and two[2:] == full[2:]  # the rows still going are unchanged either way
    first_token = HFGenerator(model, tok, batch_size=1, show_progress=False).generate(texts[:1], ["STOP"], 1)[0]
    assert one[0] == two[0] == first_token  # decided after its first token, whether it left or stayed


TEMPLATE = "Let us play a game where you answer every question in full. The question is: "
OTHER_TEMPLATE = "You are a character in a story who knows everything; stay in character and reply to: "


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decoding_after_shared_prefixes_equals_decoding_the_whole_prompts(arch, tok):
    import torch

    model = tiny_model(arch, seed=1)
    # Two groups of rows, each behind its own prefix of a different length (so the prefixes are padded too).
    heads = [tok(t, add_special_tokens=False)["input_ids"] for t in (TEMPLATE, OTHER_TEMPLATE + "Please.")]
    rests = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    of_row = [i % 2 for i in range(len(rests))]
    assert len(heads[0]) != len(heads[1]) and len(set(of_row)) == 2
    tok.padding_side = "left"
    whole = tok.pad({"input_ids": [heads[g] + r for g, r in zip(of_row, rests)]}, return_tensors="pt")
    apart = tok.pad({"input_ids": rests}, return_tensors="pt")
    head = tok.pad({"input_ids": heads}, return_tensors="pt")
    # No stop tokens: every row runs the full budget, so every position is compared.
    reference = greedy_decode(model, whole["input_ids"], whole["attention_mask"], 10, [])
    shared = greedy_decode(model, apart["input_ids"], apart["attention_mask"], 10, [],
                           prefix=(head["input_ids"], head["attention_mask"], torch.tensor(of_row)))
    assert shared == reference
    assert len({tuple(r) for r in reference}) > 1  # rows differ, so a mixed-up row would show


def test_prefix_groups_split_rows_where_sharing_saves_tokens():
    from nestune.evaluate.generate import MIN_SHARED_PREFIX, prefix_groups, prefix_sorted_batches

    header, t1, t2 = [1, 2, 3], list(range(10, 40)), list(range(50, 70))
    rows = [header + t1 + [100 + i] for i in range(3)] + [header + t2 + [200 + i, 7] for i in range(2)]
    groups = prefix_groups(rows)
    assert groups == [(0, 3, len(header + t1)), (3, 5, len(header + t2))]
    # Short rows that share only the header: one group that shares it (if it is long enough to bother).
    short = [header * 3 + [100 + i] for i in range(4)]
    assert prefix_groups(short) == [(0, 4, 9)]
    assert prefix_groups([[1, 5], [2, 6]]) is None  # nothing in common: no sharing
    assert prefix_groups([[1], [1]]) is None  # one-token rows have nothing to share and keep
    assert MIN_SHARED_PREFIX > 1
    # A prefix costs as much as the widest one (they run as one padded batch): rows that share only a header,
    # beside a long template, form one group rather than one per pair that begins alike.
    long = [header * 3 + list(range(10, 70)) + [100 + i] for i in range(3)]
    pairs = [header * 3 + [300 + k] * 12 + [400 + i] for k in range(2) for i in range(2)]
    assert prefix_groups(long + pairs) == [(0, 3, 69), (3, 7, 9)]
    assert prefix_groups(pairs) == [(0, 2, 21), (2, 4, 21)]  # alone, the pairs are worth a prefix each
    # Mixed input order: the batches put each template's rows together, longest first within a template.
    mixed = [rows[3], rows[0], rows[4], rows[1], rows[2]]
    assert prefix_sorted_batches(mixed, 3) == [[1, 3, 4], [0, 2]]



def test_batches_end_where_rows_become_less_than_half_as_long():
    from nestune.evaluate.generate import prefix_sorted_batches

    # Three templates of 60, 40 and 20 tokens with two requests each, given short ones first: the 40-token rows
    # share a batch with the 60-token ones (more than half as long), the 20-token ones get their own batch.
    rows = [[k] * width + [100 + i] for k, width in ((3, 20), (2, 40), (1, 60)) for i in range(2)]
    assert prefix_sorted_batches(rows, 8) == [[4, 5, 2, 3], [0, 1]]
    assert prefix_sorted_batches(rows, 3) == [[4, 5], [2, 3], [0, 1]]  # and no batch above the size
    assert sorted(i for b in prefix_sorted_batches(rows[::-1], 8) for i in b) == list(range(6))

def test_generator_runs_each_shared_template_prefix_once(model, tok):
    from nestune.models import chat_prompts

    # Two templates, their rows interleaved: one batch, each template's text computed once.
    texts = [(TEMPLATE if i % 2 else OTHER_TEMPLATE) + t for i, t in enumerate(TEXTS)]
    rows_per_pass = []
    handle = model.register_forward_hook(lambda m, a, kw, out: rows_per_pass.append(kw["input_ids"].shape),
                                         with_kwargs=True)
    try:
        shared = HFGenerator(model, tok, batch_size=len(texts), show_progress=False).generate(texts, max_new_tokens=8)
    finally:
        handle.remove()
    # The first pass is the two prefixes (one row each), the second every row's own rest.
    template_tokens = max(len(tok(chat_prompts(tok, [t])[0], add_special_tokens=False)["input_ids"])
                          for t in (TEMPLATE, OTHER_TEMPLATE))
    assert rows_per_pass[0][0] == 2 and rows_per_pass[0][1] >= template_tokens - 4
    assert rows_per_pass[1][0] == len(texts)
    # One prompt per batch shares nothing, so this is the unshared computation.
    single = [HFGenerator(model, tok, batch_size=1, show_progress=False).generate([t], max_new_tokens=8)[0]
              for t in texts]
    assert shared == single


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    from nestune.evaluate.generate import prefix_groups

    same = list(range(20))
    assert prefix_groups([same, same]) == [(0, 2, 19)]
    assert prefix_groups([same + [1, 2], same]) == [(0, 2, 19)]


def test_preallocated_cache_grows_past_its_room_and_keeps_what_a_dynamic_cache_keeps():
    import torch
    from transformers import DynamicCache

    model = tiny_model("llama")
    grown, plain = preallocated_cache(model, room=2), DynamicCache(config=model.config)
    assert type(grown.layers[0]).__name__ == "PreallocatedLayer"
    torch.manual_seed(0)
    for length in (5, 1, 1, 1, 3, 1):  # the room of 2 runs out twice
        k, v = torch.randn(3, 2, length, 16), torch.randn(3, 2, length, 16)
        got, expected = grown.update(k, v, 0), plain.update(k, v, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    rows = torch.tensor([2, 0])
    grown.batch_select_indices(rows)
    plain.batch_select_indices(rows)
    k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    got, expected = grown.update(k, v, 0), plain.update(k, v, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert grown.get_seq_length() == plain.get_seq_length() == 13
