"""Reading and writing model folders: config.json plus safetensors weights (sharded or not)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dflash_core.config import ConfigError, DecoderConfig, read_config_json
from dflash_core.draft import DraftConfig, DraftModel
from dflash_core.target import TargetModel

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a folder's `model.safetensors`, or of the shards its index lists."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(folder / shard))
        return tensors
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors or {SAFETENSORS_INDEX}"
    )


def load_weights(
    module: nn.Module, tensors: dict[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """Copy `tensors` into `module`, failing on any missing or unexpected name."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{what} weights do not match the config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for name, tensor in tensors.items():
        if own[name].shape != tensor.shape:
            raise ConfigError(
                f"{what} weight {name} has shape {tuple(tensor.shape)}, config expects "
                f"{tuple(own[name].shape)}"
            )
    module.load_state_dict(tensors, strict=True, assign=assign)


def load_target(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TargetModel:
    """Load a Llama/Qwen3-family causal LM from a Hugging Face folder."""
    hf = read_config_json(folder)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    config = DecoderConfig.from_hf(hf)
    tensors = {
        name.removeprefix("model."): tensor
        for name, tensor in read_safetensors(folder).items()
        if not name.endswith("rotary_emb.inv_freq")
    }
    if config.tie_word_embeddings and "embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    # Build on the meta device and adopt the loaded tensors, so no random init is paid for.
    with torch.device("meta"):
        model = TargetModel(config)
    load_weights(model, tensors, f"target model in {folder}", assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype)
    logger.info(
        "loaded target %s: %d layers, hidden %d, vocab %d, %s",
        folder,
        config.num_layers,
        config.hidden_size,
        config.vocab_size,
        dtype,
    )
    return model.eval()


def load_draft(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DraftModel:
    """Load a DFlash draft checkpoint (config.json with `dflash_config`, safetensors weights)."""
    config = DraftConfig.from_hf(read_config_json(folder))
    model = DraftModel(config).to(device)
    load_weights(model, read_safetensors(folder), f"draft model in {folder}")
    logger.info(
        "loaded draft %s: %d layers, block_size %d, target_layer_ids %s, mask_token_id %d",
        folder,
        config.decoder.num_layers,
        config.block_size,
        list(config.target_layer_ids),
        config.mask_token_id,
    )
    return model.to(dtype).eval()


def save_draft(model: DraftModel, folder: str | Path) -> None:
    """Write a draft as config.json plus model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**model.config.to_hf(), "torch_dtype": str(model.dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
