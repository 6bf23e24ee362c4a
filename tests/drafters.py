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


class TargetAsDrafter:
    """Drafts with the target model itself, greedily, with optional noise on its logits.

    With no noise every draft is accepted under greedy decoding, so whole blocks commit; with
    noise the proposals are wrong now and then, at places no test can predict. The proposal
    logits of slot i are the target's, after the drafter's own greedy guesses for slots
    1..i-1, so they depend only on the committed context, as a real draft's do.
    """

    def __init__(
        self,
        target,
        block_size: int,
        num_slots: int,
        max_seq_len: int,
        noise: float = 0.0,
        seed: int = 0,
    ):
        self.target = target
        self.block_size = block_size
        self.target_layer_ids = ()
        self.cache = target.new_cache(num_slots, max_seq_len)
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def draft(self, request: DraftRequest) -> torch.Tensor:
        slots = torch.tensor(request.slots)
        self.cache.lengths[slots] = torch.tensor(request.context_starts)
        for slot, tokens in zip(request.slots, request.context_tokens):
            if tokens:
                self.target(torch.tensor([tokens]), self.cache, torch.tensor([slot]))
        committed = self.cache.lengths[slots].clone()
        current = torch.tensor(request.last_tokens)[:, None]  # [batch, 1]
        steps = []
        for _ in range(self.block_size - 1):
            logits = self.target.logits(self.target(current, self.cache, slots).hidden)[:, -1]
            if self.noise:
                logits = logits + self.noise * torch.randn(logits.shape, generator=self.generator)
            steps.append(logits)
            current = logits.argmax(-1, keepdim=True)
        self.cache.lengths[slots] = committed
        return torch.stack(steps, dim=1)  # [batch, block_size - 1, vocab]
