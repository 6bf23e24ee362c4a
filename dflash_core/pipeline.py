"""Load a target, its tokenizer and a draft from the specs a user passes on the command line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dflash_core.checkpoint import load_draft, load_target
from dflash_core.draft import DraftModel, draft_config_for_target, new_draft_model
from dflash_core.drafting import DFlashDrafter
from dflash_core.engine import DEFAULT_PROPOSAL, SpeculativeEngine
from dflash_core.fetch import DEFAULT_MODEL, resolve_model
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)

AUTO_DRAFT = "auto"
RANDOM_DRAFT = "random"
# Trained drafts that ship with the package, one folder per target folder name.
SHIPPED_DRAFTS_DIR = Path(__file__).parent / "drafts"
RANDOM_DRAFT_SEED = 0
DEFAULT_BLOCK_SIZE = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# "auto" is CUDA when torch finds a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class LoadedTarget:
    model: TargetModel
    tokenizer: PreTrainedTokenizerBase
    folder: Path
    eos_token_ids: tuple[int, ...]


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a --device value; ValueError if it cannot be used here."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r} is not supported; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device cuda was requested but torch {torch.__version__} sees no CUDA GPU; pass "
            "--device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    return torch.device(name)


def load_target_and_tokenizer(
    spec: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"
) -> LoadedTarget:
    """Resolve a model spec (known name, .gguf file or HF folder) and load it with its tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    torch_device = resolve_device(device)  # before a model download, which a bad device wastes
    folder = resolve_model(spec)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected one of {', '.join(TOKENIZER_FILES)} next to "
            "config.json"
        )
    model = load_target(folder, dtype=DTYPES[dtype], device=torch_device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedTarget(model, tokenizer, folder, eos_token_ids(tokenizer, folder))


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, folder: Path) -> tuple[int, ...]:
    """Collect end-of-sequence ids from the tokenizer and generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def default_mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Pick a mask id for a new draft: the tokenizer's mask token, else an unused special token.

    An added token that is neither bos/eos/pad/unk nor named in the chat template is one the
    model never needs to read or write in normal use.
    """
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    reserved = {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    }
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    candidates = [
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token_id not in reserved and token.content not in template
    ]
    if not candidates:
        raise ValueError(
            "the tokenizer has no unused special token to serve as the draft's mask token; "
            "pass mask_token_id explicitly"
        )
    return max(candidates)


def shipped_draft(target: LoadedTarget) -> Path | None:
    """Return the draft folder shipped in this package for the target, if there is one."""
    folder = SHIPPED_DRAFTS_DIR / target.folder.name
    return folder if (folder / "config.json").is_file() else None


def build_draft(
    spec: str,
    target: LoadedTarget,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    num_layers: int = 1,
    dtype: str = "float32",
    device: str | torch.device | None = None,
) -> DraftModel | None:
    """Load a draft for `target` from a spec.

    `auto`: the draft shipped for this target, or None (plain decoding) with a warning;
    `random`: a randomly initialised draft with a fixed seed; otherwise a checkpoint folder.
    The draft goes on `device`, by default the target's.
    """
    device = device if device is not None else target.model.device
    if spec == AUTO_DRAFT:
        folder = shipped_draft(target)
        if folder is None:
            logger.warning(
                "no draft ships for target %s; decoding without a draft. Pass --draft FOLDER "
                "(train one with `dflash train`) or --draft random",
                target.folder,
            )
            return None
        logger.info("using the shipped draft %s", folder)
        return load_draft(folder, dtype=DTYPES[dtype], device=device)
    if spec == RANDOM_DRAFT:
        config = draft_config_for_target(
            target.model.config,
            num_layers=num_layers,
            block_size=block_size,
            mask_token_id=default_mask_token_id(target.tokenizer),
        )
        logger.info(
            "building a random draft (seed %d): %d layer(s), block_size %d, mask_token_id %d",
            RANDOM_DRAFT_SEED,
            num_layers,
            block_size,
            config.mask_token_id,
        )
        draft = new_draft_model(config, seed=RANDOM_DRAFT_SEED)
        return draft.to(device=device, dtype=DTYPES[dtype]).eval()
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"draft {spec!r} not found: pass a folder with config.json and model.safetensors, "
            f"{AUTO_DRAFT!r} for the shipped draft, or {RANDOM_DRAFT!r} for a randomly "
            "initialised one"
        )
    return load_draft(folder, dtype=DTYPES[dtype], device=device)


def build_engine(
    target: LoadedTarget,
    draft: DraftModel | None,
    *,
    max_seq_len: int,
    num_slots: int = 1,
    block_size: int | None = None,
    proposal: str = DEFAULT_PROPOSAL,
) -> SpeculativeEngine:
    drafter = None
    if draft is not None:
        drafter = DFlashDrafter.for_target(
            draft,
            target.model,
            num_slots=num_slots,
            max_seq_len=max_seq_len,
            block_size=block_size,
        )
    return SpeculativeEngine(
        target.model,
        drafter,
        max_seq_len=max_seq_len,
        num_slots=num_slots,
        eos_token_ids=target.eos_token_ids,
        decode=partial(target.tokenizer.decode, skip_special_tokens=True),
        proposal=proposal,
    )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool = True
) -> list[int]:
    """Tokenize a prompt, as a single user message through the chat template by default."""
    if chat_template and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here, older releases a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt, add_special_tokens=True)
