"""The `dflash` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from dflash_core.engine import GenerationResult
from dflash_core.fetch import DEFAULT_MODEL, ConversionError, FetchError
from dflash_core.pipeline import (
    DEFAULT_BLOCK_SIZE,
    DTYPES,
    RANDOM_DRAFT,
    build_draft,
    build_engine,
    decode_output,
    encode_prompt,
    load_target_and_tokenizer,
)
from dflash_core.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams

logger = logging.getLogger("dflash")

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def result_json(result: GenerationResult, text: str) -> dict:
    """The JSON object printed for one generation."""
    return {
        "text": text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "num_prompt_tokens": result.num_prompt_tokens,
        "num_completion_tokens": len(result.token_ids),
        "num_steps": result.num_steps,
        "acceptance_lengths": result.acceptance_lengths,
        "mean_acceptance_length": round(result.mean_acceptance_length, 4),
        "prefill_seconds": round(result.prefill_seconds, 4),
        "decode_seconds": round(result.decode_seconds, 4),
        "decode_tokens_per_second": round(result.decode_tokens_per_second, 3),
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"target model: a known name, a .gguf file or a Hugging Face folder "
        f"(default: {DEFAULT_MODEL})",
    )
    drafts = parser.add_mutually_exclusive_group()
    drafts.add_argument(
        "--draft",
        default=RANDOM_DRAFT,
        help=f"draft checkpoint folder, or {RANDOM_DRAFT!r} for a randomly initialised draft "
        "with a fixed seed (default)",
    )
    drafts.add_argument(
        "--no-draft", action="store_true", help="plain greedy decoding with the target alone"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"draft block size in tokens (default: the draft's own, {DEFAULT_BLOCK_SIZE} for "
        "a random draft)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="weight and activation dtype (default: float32)",
    )


def run_generate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target_and_tokenizer(args.model, args.dtype)
    draft = None
    if not args.no_draft:
        draft = build_draft(
            args.draft, target, block_size=args.block_size or DEFAULT_BLOCK_SIZE, dtype=args.dtype
        )
    block_size = args.block_size or (draft.config.block_size if draft else 1)
    prompt_ids = encode_prompt(target.tokenizer, args.prompt, not args.no_chat_template)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    limit = target.model.config.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} "
            f"exceeds the model's context of {limit} tokens; lower --max-new-tokens"
        )
    engine = build_engine(
        target,
        draft,
        max_seq_len=len(prompt_ids) + params.max_new_tokens + block_size,
        block_size=args.block_size,
    )
    logger.info(
        "generating: model %s, draft %s, block_size %d, prompt %d tokens, max_new_tokens %d",
        target.folder,
        "none" if draft is None else args.draft,
        engine.block_size,
        len(prompt_ids),
        params.max_new_tokens,
    )
    result = engine.generate(prompt_ids, params)
    text = decode_output(
        target.tokenizer, result.token_ids, result.finish_reason, target.eos_token_ids
    )
    if args.json:
        print(json.dumps(result_json(result, text), ensure_ascii=False))
    else:
        print(text)
        print(
            f"[{len(result.token_ids)} tokens, finish_reason {result.finish_reason}, "
            f"{result.num_steps} steps, mean acceptance length "
            f"{result.mean_acceptance_length:.2f}, {result.decode_tokens_per_second:.1f} "
            "decode tokens/s]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash",
        description="DFlash block-diffusion speculative decoding: generate, benchmark, serve.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a completion for one prompt")
    generate.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a short coding request)"
    )
    add_model_arguments(generate)
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"tokens to generate at most (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    generate.add_argument(
        "--no-chat-template",
        action="store_true",
        help="tokenize the prompt as raw text instead of a user message",
    )
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    generate.set_defaults(run=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FetchError, ConversionError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
