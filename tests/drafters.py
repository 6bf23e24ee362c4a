"""Test drafters whose proposals, and so whose acceptance pattern, are known in advance."""

from __future__ import annotations

import torch

from dflash_core.drafting import DraftRequest


class OracleDrafter:
    """Proposes the continuation from a known reference output, optionally with wrong tokens.

    `wrong_after[step]` = j makes draft j of that step (0-based) wrong, so exactly j drafts are
    accepted; steps not listed propose the reference perfectly. `tokens` can replace the
    reference for proposals that do not need to be accepted.
    """

    def __init__(self, vocab_size: int, block_size: int, target_layer_ids: tuple[int, ...] = ()):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.target_layer_ids = target_layer_ids
        self.references: dict[int, tuple[int, list[int]]] = {}  # slot -> (prompt len, output)
        self.wrong_after: dict[int, int] = {}
        self.steps = 0
        self.requests: list[DraftRequest] = []

    def expect(self, slot: int, prompt_len: int, reference: list[int]) -> None:
        self.references[slot] = (prompt_len, reference)

    def draft(self, request: DraftRequest) -> torch.Tensor:
        self.requests.append(request)
        width = self.block_size - 1
        logits = torch.zeros(len(request.slots), width, self.vocab_size)
        for row, slot in enumerate(request.slots):
            prompt_len, reference = self.references[slot]
            cached = request.context_starts[row] + request.context[row].shape[0]
            newest = cached - prompt_len  # index of last_tokens[row] in the output
            proposal = (reference[newest + 1 : newest + 1 + width] + [0] * width)[:width]
            wrong = self.wrong_after.get(self.steps)
            if wrong is not None and wrong < width:
                proposal[wrong] = (proposal[wrong] + 1) % self.vocab_size
            logits[row, torch.arange(width), torch.tensor(proposal)] = 10.0
        self.steps += 1
        return logits
