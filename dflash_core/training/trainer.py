"""Train a DFlash draft for a frozen target on target-generated responses.

Target hidden states are computed once per sequence before the first epoch and cached next to
the data (see target_states.py). Anchors are re-drawn every epoch.

`precision="bfloat16"` runs the forward pass under bf16 autocast (weights and
optimizer state stay float32): measured 1.45 s against 2.15 s per step on a 2-core AVX-512 BF16
CPU (2 layers, 8 sequences of 64 blocks), but 41 s against 1.9 s on a 2-core AVX2 CPU, which
has no bf16 instructions (a warning says so). A run may start from the weights of an existing draft
(`init_from`) to train it further on the same or new data.

The loss normally scores the draft over the tokens that occur in the training data
(`train_vocab="data"`), not the whole vocabulary: on CPU the LM head over 49K tokens costs more
than the rest of the step, while the data of one target uses a few thousand distinct tokens.
The draft checkpoint keeps that token list and proposes only those tokens at inference, which
also makes its LM head cheap there; `train_vocab="full"` trains and drafts over every token.

`distill_weight` > 0 mixes a soft-label loss into each slot's cross-entropy: the target's own
top-k distribution for that token (renormalised over the draft's vocabulary) as the label. It
carries more per token than the one token in the data. For sampled responses its argmax is the
target's own pick, which greedy verification checks against, rather than the sampled token.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dflash_core.checkpoint import load_draft, read_config_json, save_draft
from dflash_core.draft import (
    DraftConfig,
    DraftModel,
    default_target_layer_ids,
    draft_config_for_target,
    new_draft_model,
)
from dflash_core.target import TargetModel
from dflash_core.training.blocks import (
    accepted_draft_tokens,
    block_attention_mask,
    default_gamma,
    draft_blocks_forward,
    sample_anchors,
    slot_weights,
)
from dflash_core.training.data import TrainingSequence
from dflash_core.training.target_states import load_or_run_target

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
TRAIN_VOCABS = ("data", "full")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
# Steps averaged for the acceptance-length estimate in the training summary.
SUMMARY_WINDOW = 50


@dataclass(frozen=True)
class TrainConfig:
    num_layers: int = 1
    block_size: int = 8
    num_tapped_layers: int = 3  # target layers read by the draft, spaced by the default rule
    intermediate_size: int | None = None  # None: the target's
    mask_token_id: int = 0
    anchors_per_sequence: int = 32
    gamma: float | None = None  # None: default_gamma(block_size)
    learning_rate: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 3
    sequences_per_step: int = 4
    checkpoint_every: int = 100  # optimizer steps
    seed: int = 0
    train_vocab: str = "data"  # "data": loss over the tokens in the data; "full": all tokens
    precision: str = "float32"  # "bfloat16": forward pass under bf16 autocast
    init_from: str | None = None  # draft folder whose weights start the run
    # Weight of the soft-label loss against the target's top-k distribution (0: labels only).
    distill_weight: float = 0.0
    distill_top_k: int = 32

    def __post_init__(self) -> None:
        if self.train_vocab not in TRAIN_VOCABS:
            raise ValueError(
                f"train_vocab {self.train_vocab!r} is not one of {', '.join(TRAIN_VOCABS)}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(
                f"distill_weight {self.distill_weight} is out of range; pass a value from 0 "
                "(labels only) to 1 (the target's distribution only)"
            )
        if self.distill_top_k < 1:
            raise ValueError(
                f"distill_top_k {self.distill_top_k} is too small; pass 1 or more tokens"
            )


@dataclass
class StepStats:
    loss: float
    slot_accuracy: list[float]  # per slot 1..B-1: fraction of argmax hits
    # Mean over the step's blocks of 1 + the slots hit before the first miss: the tokens a
    # greedy verify step would commit with these proposals (tau, measured on training data).
    acceptance_length: float = float("nan")


def training_hardware(device: torch.device) -> str:
    """Describe where a run trained, for its summary and model card."""
    torch_version = f"torch {torch.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {torch_version}"
    cpu = f"{platform.machine()} {platform.processor() or ''}".strip()
    return f"{cpu} {torch.get_num_threads()} threads, {torch_version}"


def cpu_has_bf16_instructions() -> bool | None:
    """Return whether this CPU has AVX-512 BF16 or AMX BF16 (None: unknown, not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def read_initial_config(folder: str) -> DraftConfig:
    """Read the config of the draft a run starts from (`init_from`)."""
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(
            f"init_from (--init-from) {folder}: no draft there; pass a folder with "
            "config.json and model.safetensors, such as a training run's --out folder"
        )
    return DraftConfig.from_hf(read_config_json(folder))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class DraftTrainer:
    def __init__(
        self,
        target: TargetModel,
        sequences: list[TrainingSequence],
        config: TrainConfig,
        out_dir: str | Path,
        features_dir: str | Path | None = None,
    ) -> None:
        self.target = target.float().eval()
        for param in self.target.parameters():
            param.requires_grad_(False)
        self.sequences = sequences
        self.config = config
        self.out_dir = Path(out_dir)
        self.features_dir = Path(features_dir) if features_dir is not None else self.out_dir
        self.gamma = config.gamma or default_gamma(config.block_size)
        layer_ids = default_target_layer_ids(target.config.num_layers, config.num_tapped_layers)
        head = self.target.lm_head.weight.detach()
        vocab_size = head.shape[0]
        vocab_ids: tuple[int, ...] = ()
        start_config = read_initial_config(config.init_from) if config.init_from else None
        if config.train_vocab == "data":
            # The loss scores these rows of the LM head; label_rows maps a token to its row
            # (-100: not scored). The draft keeps the list and proposes only these tokens.
            # A draft trained further keeps every token it could propose before.
            tokens = {t for s in sequences for t in s.token_ids}
            if start_config is not None:
                tokens.update(start_config.draft_vocab_ids)
            vocab_ids = tuple(sorted(tokens))
            ids = torch.tensor(vocab_ids, dtype=torch.long)
            self.head = head[ids].contiguous()
            self.label_rows = torch.full((vocab_size,), -100, dtype=torch.long)
            self.label_rows[ids] = torch.arange(len(ids))
        else:
            self.head = head
            self.label_rows = torch.arange(vocab_size)
        draft_config = draft_config_for_target(
            target.config,
            num_layers=config.num_layers,
            block_size=config.block_size,
            mask_token_id=config.mask_token_id,
            target_layer_ids=layer_ids,
            intermediate_size=config.intermediate_size,
            draft_vocab_ids=vocab_ids,
        )
        # The draft trains where the target is; index tensors are built on the CPU and moved.
        # NOTE: training on a GPU has not run yet (the build machines have none).
        self.device = self.target.device
        self.label_rows = self.label_rows.to(self.device)
        if (
            config.precision == "bfloat16"
            and self.device.type == "cpu"
            and cpu_has_bf16_instructions() is False
        ):
            logger.warning(
                "precision bfloat16 on a CPU without AVX-512 BF16 or AMX: bf16 math is emulated "
                "there (measured 41 s against 1.9 s per step in float32 on a 2-core AVX2 CPU); "
                "pass --precision float32"
            )
        self.model: DraftModel = new_draft_model(draft_config, seed=config.seed)
        self.model = self.model.to(self.device).train()
        if config.init_from is not None:
            self._load_initial_weights(config.init_from)
        self.weights = slot_weights(config.block_size, self.gamma).to(self.device)
        steps_per_epoch = math.ceil(len(sequences) / config.sequences_per_step)
        self.total_steps = steps_per_epoch * config.epochs
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        warmup = max(1, int(config.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, self.total_steps, warmup)
        )
        self.step = 0
        self.features: list[torch.Tensor] = []
        # Per sequence: the target's top-k ids and probabilities (filled when distilling).
        self.teacher: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- one sequence ----------------------------------------------------------------------

    def _load_initial_weights(self, folder: str) -> None:
        """Start from the weights of the draft in `folder`; its shapes must match this run's.

        A run with more layers than that draft grows it. The draft's layers come first, and
        each added layer starts with zero output projections (attention o_proj, MLP down_proj).
        An added layer then adds nothing to the residual stream, so the grown draft proposes
        exactly what the start draft did until training changes it.
        """
        start = load_draft(folder)
        ours, theirs = self.model.state_dict(), start.state_dict()
        added = range(start.config.decoder.num_layers, self.model.config.decoder.num_layers)
        grown = {f"layers.{index}." for index in added}

        def is_added(name: str) -> bool:
            return any(name.startswith(prefix) for prefix in grown)

        differ = sorted(
            name
            for name in ours.keys() | theirs.keys()
            if not (name in ours and is_added(name))
            and (name not in ours or name not in theirs or ours[name].shape != theirs[name].shape)
        )
        if differ:
            raise ValueError(
                f"the draft in {folder} does not fit this run ({len(differ)} tensors differ, "
                f"first {differ[0]!r}); pass the --block-size, --tapped-layers and "
                "--intermediate-size it was trained with, and --layers no smaller than its "
                f"{start.config.decoder.num_layers}"
            )
        self.model.load_state_dict(theirs, strict=False)
        for index in added:
            layer = self.model.layers[index]
            with torch.no_grad():
                for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    projection.weight.zero_()
                    if projection.bias is not None:
                        projection.bias.zero_()
        if added:
            logger.info(
                "starting from the weights of the draft in %s, grown from %d to %d layers",
                folder,
                start.config.decoder.num_layers,
                self.model.config.decoder.num_layers,
            )
        else:
            logger.info("starting from the weights of the draft in %s", folder)

    def sequence_loss(
        self, index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return a sequence's weighted loss sum, weight sum, hits and counts [2, B], and accepted.

        `accepted` [A] counts, per block, the slots predicted right before the first miss.
        """
        seq = self.sequences[index]
        block_size = self.config.block_size
        tokens = torch.tensor(seq.token_ids)
        anchors = sample_anchors(
            len(tokens), seq.response_start, self.config.anchors_per_sequence, generator
        )
        slot = torch.arange(block_size)
        positions = (anchors[:, None] + slot).flatten()  # [A * B]
        block_ids = torch.full((len(anchors), block_size), self.model.config.mask_token_id)
        block_ids[:, 0] = tokens[anchors]
        labels = torch.where(
            positions < len(tokens), tokens[positions.clamp_max(len(tokens) - 1)], -100
        )
        labels = labels.view(len(anchors), block_size)
        labels[:, 0] = -100  # slot 0 contains a known token
        features = self.features[index].to(self.device).float()
        context = self.model.context_features(features[None])[0]
        mask = block_attention_mask(anchors, block_size, len(tokens)).to(self.device)
        labels, positions = labels.to(self.device), positions.to(self.device)
        embeds = self.target.embed_tokens(block_ids.flatten().to(self.device))
        hidden = draft_blocks_forward(self.model, embeds, positions, context, mask)
        logits = F.linear(hidden, self.head).view(len(anchors), block_size, -1)
        labels = torch.where(labels == -100, -100, self.label_rows[labels.clamp_min(0)])
        losses = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(len(anchors), block_size)
        if self.config.distill_weight > 0:
            soft = self._teacher_loss(index, positions, logits.flatten(0, 1))
            weight = self.config.distill_weight
            losses = (1.0 - weight) * losses + weight * soft.view(len(anchors), block_size)
        valid = labels != -100
        weights = self.weights[None, :] * valid
        correct = (logits.argmax(-1) == labels) & valid
        return (
            (losses * weights).sum(),
            weights.sum(),
            torch.stack([correct.sum(0), valid.sum(0)]),
            accepted_draft_tokens(correct),
        )

    def _teacher_loss(
        self, index: int, positions: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Return the cross-entropy [A * B] of logits against the target's top-k distributions.

        `positions` [A * B] are the token positions the slots predict; the target's distribution
        of token p sits in row p - 1. Teacher tokens outside the draft vocabulary are dropped
        and the rest renormalised.
        """
        top_ids, top_probs = self.teacher[index]
        rows = (positions - 1).clamp(0, len(top_ids) - 1).cpu()
        draft_rows = self.label_rows[top_ids[rows].to(self.device).long()]  # [A * B, K]
        probs = torch.where(draft_rows >= 0, top_probs[rows].to(self.device).float(), 0.0)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-6)
        log_probs = logits.float().log_softmax(-1).gather(-1, draft_rows.clamp_min(0))
        return -(probs * log_probs).sum(-1)

    # ---- loop ------------------------------------------------------------------------------

    def train(self, stop_at_step: int | None = None) -> dict:
        """Run all epochs, resuming from the last checkpoint if there is one; returns a summary.

        `stop_at_step` ends this call early (after a checkpoint) so long runs can be split.
        """
        began = time.perf_counter()
        self._resume()
        if not self.features:
            self._load_target_states()
        config = self.config
        progress = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step")
        last = StepStats(float("nan"), [])
        recent: list[float] = []  # acceptance lengths of the last SUMMARY_WINDOW steps
        end = min(self.total_steps, stop_at_step or self.total_steps)
        while self.step < end:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            order = torch.randperm(
                len(self.sequences), generator=torch.Generator().manual_seed(config.seed + epoch)
            )
            start = step_in_epoch * config.sequences_per_step
            batch = order[start : start + config.sequences_per_step].tolist()
            # Anchors depend only on (seed, step), so a resumed run draws the same ones.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
            last = self._optimizer_step(batch, generator)
            recent = [*recent[1 - SUMMARY_WINDOW :], last.acceptance_length]
            self.step += 1
            progress.update(1)
            progress.set_postfix(
                loss=f"{last.loss:.3f}",
                acc=" ".join(f"{a:.2f}" for a in last.slot_accuracy[:4]),
                tau=f"{last.acceptance_length:.2f}",
                epoch=epoch,
            )
            if self.step % config.checkpoint_every == 0 or self.step == end:
                self._save_checkpoint()
        progress.close()
        save_draft(self.model.eval(), self.out_dir)
        summary = {
            "steps": self.step,
            "epochs": config.epochs,
            "sequences": len(self.sequences),
            "final_loss": last.loss,
            "final_slot_accuracy": last.slot_accuracy,
            # None when this call ran no step (the run had already finished).
            "train_acceptance_length": round(sum(recent) / len(recent), 3) if recent else None,
            "train_acceptance_steps": len(recent),
            "wall_seconds": round(time.perf_counter() - began, 1),
            "gamma": self.gamma,
            "target_layer_ids": list(self.model.config.target_layer_ids),
            "hardware": training_hardware(self.device),
            "config": asdict(config),
        }
        (self.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _optimizer_step(self, batch: list[int], generator: torch.Generator) -> StepStats:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), device=self.device)
        total_weight = torch.zeros((), device=self.device)
        counts = torch.zeros(2, self.config.block_size, device=self.device)
        accepted = blocks = 0
        dtype = PRECISIONS[self.config.precision]
        with torch.autocast(self.head.device.type, dtype=dtype, enabled=dtype is not None):
            for index in batch:
                loss, weight, stats, block_accepted = self.sequence_loss(index, generator)
                total_loss = total_loss + loss.float()
                total_weight = total_weight + weight
                counts += stats
                accepted += int(block_accepted.sum())
                blocks += len(block_accepted)
        loss = total_loss / total_weight.clamp_min(1e-6)
        loss.backward()  # outside autocast: backward ops take the dtypes of their forward ops
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        accuracy = (counts[0, 1:] / counts[1, 1:].clamp_min(1)).tolist()
        return StepStats(loss.item(), accuracy, 1.0 + accepted / max(1, blocks))

    def _load_target_states(self) -> None:
        """Fill features (and teacher) from each data folder's caches, running the target for
        what they lack."""
        top_k = self.config.distill_top_k if self.config.distill_weight > 0 else 0
        groups: dict[Path, list[int]] = {}
        for index, seq in enumerate(self.sequences):
            groups.setdefault(seq.features_dir or self.features_dir, []).append(index)
        states = [None] * len(self.sequences)
        for folder, indices in groups.items():
            found = load_or_run_target(
                self.target,
                folder,
                [self.sequences[i] for i in indices],
                self.model.config.target_layer_ids,
                top_k,
            )
            for index, result in zip(indices, found):
                states[index] = result
        self.features = [result.tapped for result in states]
        if top_k:
            self.teacher = [(result.top_ids, result.top_probs) for result in states]

    def _save_checkpoint(self) -> None:
        folder = self.out_dir / CHECKPOINT_DIR
        save_draft(self.model, folder)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
        }
        torch.save(state, folder / TRAINER_STATE)
        logger.info("checkpoint at step %d/%d saved to %s", self.step, self.total_steps, folder)

    def _resume(self) -> None:
        folder = self.out_dir / CHECKPOINT_DIR
        state_file = folder / TRAINER_STATE
        if not state_file.is_file():
            return
        # On the CPU first: a run saved on a GPU may resume on another device.
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["config"] != asdict(self.config):
            raise ValueError(
                f"the checkpoint in {folder} was made with another training config; use a new "
                "--out folder or the same options"
            )
        self.model.load_state_dict(load_draft(folder).state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        logger.info("resumed training from %s at step %d", folder, self.step)
