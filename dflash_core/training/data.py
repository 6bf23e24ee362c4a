"""Training sequences: the prompt and target response token ids that datagen wrote."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainingSequence:
    record_id: str
    token_ids: list[int]  # prompt followed by the target's response
    response_start: int
    # The folder whose cache files contain this sequence's target states (None: the trainer's).
    features_dir: Path | None = None


def read_sequences(
    path: str | Path, max_len: int, features_dir: str | Path | None = None
) -> list[TrainingSequence]:
    """Read generated data (JSONL with prompt_ids and response_ids), cut to max_len tokens.

    A path ending in .gz is read as gzip-compressed JSONL.

    `features_dir` names the folder that caches these sequences' target states; by default the
    trainer's `features_dir`.
    """
    folder = Path(features_dir) if features_dir is not None else None
    sequences = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            ids = (record["prompt_ids"] + record["response_ids"])[:max_len]
            start = len(record["prompt_ids"])
            if len(ids) - start >= 2:
                sequences.append(TrainingSequence(record["record_id"], ids, start, folder))
    if not sequences:
        raise ValueError(f"no usable training sequences in {path}")
    return sequences
