"""Small random models and comparison helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from dflash_core.checkpoint import load_target
from dflash_core.target import TargetModel

VOCAB = 96


def hf_config(family: str, **overrides: object) -> transformers.PretrainedConfig:
    """Return a tiny transformers config of the Llama or Qwen3 family."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


def save_random_hf_model(
    folder: Path, family: str = "llama", seed: int = 0, **overrides: object
) -> transformers.PreTrainedModel:
    """Save a randomly initialised transformers causal LM to `folder` and return it."""
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Larger weights than the default init give sharper, more varied logits.
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(folder)
    return model


def random_target(
    folder: Path, family: str = "llama", seed: int = 0, **overrides: object
) -> TargetModel:
    save_random_hf_model(folder, family, seed, **overrides)
    return load_target(folder)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Assert closeness and report the max and mean absolute error seen."""
    error = (actual.float() - expected.float()).abs()
    assert error.max() <= atol, (
        f"{what}: max abs error {error.max():.3g}, mean {error.mean():.3g} (atol {atol})"
    )


def wait_for_endpoint(process, address: str, timeout: float) -> None:
    """Read `dflash serve` stdout until the line with `address`, failing after `timeout` s.

    Ray's log lines from the cluster's workers can reach stdout before the endpoint line.
    """
    import select
    import time

    deadline = time.monotonic() + timeout
    printed: list[str] = []
    while not any(address in line for line in printed):
        wait = max(deadline - time.monotonic(), 0)
        ready, _, _ = select.select([process.stdout], [], [], wait)
        assert ready, f"dflash serve printed no endpoint within {timeout} s: {printed}"
        printed.append(process.stdout.readline())
        assert printed[-1], f"dflash serve exited before printing its endpoint: {printed}"
