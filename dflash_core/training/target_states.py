"""One pass of the frozen target over each training sequence, cached next to the data.

The pass yields the tapped hidden states the draft reads and, when distillation is on, the
target's top-k next-token distribution at every position. Both are computed once per sequence,
kept in memory and cached on disk, one entry per record id and one file per data folder. The
target is frozen, so they never change. Recomputing them would cost a full target forward per
sequence for every epoch, resume or new training run, and a run on grown data runs the target
only on the new records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dflash_core.target import TargetModel
from dflash_core.training.data import TrainingSequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetStates:
    tapped: torch.Tensor  # [seq_len, n * hidden] bf16 on the CPU
    # The target's top_k likeliest tokens after each position ([seq_len, top_k] int32) and their
    # probabilities at temperature 1 ([seq_len, top_k] float16), zero in the prompt rows; None
    # without distillation.
    top_ids: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None


def features_file(folder: str | Path, layer_ids: tuple[int, ...]) -> Path:
    """Return the file that caches a data folder's tapped target states for these layers."""
    return Path(folder) / f"target_states_{'-'.join(str(i) for i in layer_ids)}.pt"


def teacher_file(folder: str | Path, top_k: int) -> Path:
    """Return the file that caches a data folder's top-k target distributions."""
    return Path(folder) / f"target_top{top_k}.pt"


def token_key(token_ids: list[int]) -> tuple[int, int]:
    """Return the length and checksum of a token list. A cache entry must match both."""
    return len(token_ids), hash(tuple(token_ids))


def sequence_key(seq: TrainingSequence) -> tuple[int, int]:
    """Return the cache key of a training sequence's tokens."""
    return token_key(seq.token_ids)


@torch.inference_mode()
def run_target(
    target: TargetModel,
    sequences: list[TrainingSequence],
    layer_ids: tuple[int, ...],
    top_k: int = 0,
) -> list[TargetStates]:
    """Run the target over every sequence. With top_k > 0 it also keeps the top-k distributions."""
    results = []
    device = target.device
    for seq in tqdm(sequences, desc="target hidden states", unit="seq"):
        cache = target.new_cache(1, len(seq.token_ids))
        ids = torch.tensor([seq.token_ids], device=device)
        out = target(ids, cache, torch.tensor([0], device=device), layer_ids)
        tapped = out.tapped[0].to(torch.bfloat16).cpu()
        if top_k == 0:
            results.append(TargetStates(tapped))
            continue
        # Training reads only the rows after the prompt, so the prompt rows stay zero.
        first = seq.response_start
        logits = target.logits(out.hidden[0, first:])  # [seq_len - first, vocab] fp32
        top = logits.topk(top_k, dim=-1)
        top_ids = torch.zeros(len(seq.token_ids), top_k, dtype=torch.int32)
        top_probs = torch.zeros(len(seq.token_ids), top_k, dtype=torch.float16)
        top_ids[first:] = top.indices.int().cpu()
        top_probs[first:] = (top.values - logits.logsumexp(-1, keepdim=True)).exp().half().cpu()
        results.append(TargetStates(tapped, top_ids, top_probs))
    return results


def tap_target(
    target: TargetModel, sequences: list[TrainingSequence], layer_ids: tuple[int, ...]
) -> list[torch.Tensor]:
    """Return tapped target states [T, n * hidden] (bf16, on the CPU) for every sequence."""
    return [states.tapped for states in run_target(target, sequences, layer_ids)]


def _read_cache(path: Path) -> dict:
    return torch.load(path, weights_only=False)["records"] if path.is_file() else {}


class StateRecorder:
    """Recorder of the tapped target states that data generation computes anyway.

    Generating a response runs the target over its prompt and every response token but the
    last. With the draft's tapped layers turned on, the engine therefore hands over every row a
    training sequence needs but the last one, which is left zero because training never reads
    it: a block's context ends before its anchor, and anchors end two tokens before the end.
    The states go to the data folder's cache with the key `load_or_run_target` gives a
    sequence cut at `max_len`, so training runs the target only on what the recorder missed.
    """

    def __init__(self, folder: str | Path, layer_ids: tuple[int, ...], max_len: int) -> None:
        self.path = features_file(folder, layer_ids)
        self.layer_ids = layer_ids
        self.max_len = max_len
        self.records = _read_cache(self.path)
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.unsaved = 0

    def add(self, request_id: str, states: torch.Tensor) -> None:
        """Append the rows of a request's next tokens (the engine's `on_tapped` hook)."""
        self.pending.setdefault(request_id, []).append(states.to(torch.bfloat16).cpu())

    def finish(self, request_id: str, token_ids: list[int]) -> bool:
        """Store the rows of a finished response, given its prompt and response ids.

        Returns False when the rows do not cover the tokens. Training then computes them.
        """
        rows = self.pending.pop(request_id, [])
        states = torch.cat(rows) if rows else torch.empty(0)
        if states.shape[0] != len(token_ids) - 1:
            logger.warning(
                "record %s: %d tapped rows recorded for %d tokens, expected %d, so training "
                "will run the target on it",
                request_id,
                states.shape[0],
                len(token_ids),
                len(token_ids) - 1,
            )
            return False
        ids = token_ids[: self.max_len]
        padded = torch.cat([states, states.new_zeros(1, states.shape[1])])[: len(ids)]
        self.records[request_id] = (token_key(ids), padded)
        self.unsaved += 1
        return True

    def save(self) -> None:
        """Write the cache file through a temporary file, so a killed save keeps the old one."""
        if not self.unsaved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".pt.partial")
        torch.save({"layer_ids": list(self.layer_ids), "records": self.records}, partial)
        partial.replace(self.path)
        logger.info("saved tapped target states of %d records to %s", len(self.records), self.path)
        self.unsaved = 0


def load_or_run_target(
    target: TargetModel,
    folder: Path,
    sequences: list[TrainingSequence],
    layer_ids: tuple[int, ...],
    top_k: int = 0,
) -> list[TargetStates]:
    """Return the target states of sequences cached in `folder`.

    The target runs only for records that a cache file lacks or stores for other tokens.
    """
    seen: set[str] = set()
    for seq in sequences:
        if seq.record_id in seen:
            raise ValueError(
                f"record id {seq.record_id!r} appears twice in the data cached in {folder}; "
                "target states are cached by record id, so give each data file its own "
                "folder (one datagen --out folder per run) and pass the folders to --data"
            )
        seen.add(seq.record_id)

    states_path = features_file(folder, layer_ids)
    tapped = _read_cache(states_path)
    teacher_path = teacher_file(folder, top_k)
    teacher = _read_cache(teacher_path) if top_k else {}

    def cached(cache: dict, seq: TrainingSequence) -> bool:
        return seq.record_id in cache and cache[seq.record_id][0] == sequence_key(seq)

    missing = [
        seq for seq in sequences if not cached(tapped, seq) or (top_k and not cached(teacher, seq))
    ]
    logger.info(
        "target states: %d of %d sequences cached in %s",
        len(sequences) - len(missing),
        len(sequences),
        folder,
    )
    if missing:
        for seq, result in zip(missing, run_target(target, missing, layer_ids, top_k)):
            tapped[seq.record_id] = (sequence_key(seq), result.tapped)
            if top_k:
                teacher[seq.record_id] = (sequence_key(seq), result.top_ids, result.top_probs)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"layer_ids": list(layer_ids), "records": tapped}, states_path)
        if top_k:
            torch.save({"top_k": top_k, "records": teacher}, teacher_path)

    results = []
    for seq in sequences:
        if top_k:
            _, top_ids, top_probs = teacher[seq.record_id]
            results.append(TargetStates(tapped[seq.record_id][1], top_ids, top_probs))
        else:
            results.append(TargetStates(tapped[seq.record_id][1]))
    return results
