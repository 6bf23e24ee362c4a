"""The `dflash` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

from dflash_core import cli_training
from dflash_core.engine import DEFAULT_PROPOSAL
from dflash_core.fetch import DEFAULT_MODEL, ConversionError, FetchError
from dflash_core.pipeline import (
    AUTO_DRAFT,
    DEFAULT_BLOCK_SIZE,
    DEVICES,
    DTYPES,
    RANDOM_DRAFT,
    LoadedTarget,
    build_draft,
    build_engine,
    encode_prompt,
    load_target_and_tokenizer,
)
from dflash_core.sampling import DEFAULT_MAX_NEW_TOKENS, PROPOSAL_MODES, SamplingParams
from dflash_core.scheduler import Request, Scheduler
from dflash_core.sequence import GenerationResult

logger = logging.getLogger("dflash")

DEFAULT_MAX_BATCH_SIZE = 4
MAX_BLOCK_SIZE = 64
DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def result_json(result: GenerationResult) -> dict:
    """Build the JSON object printed for one generation."""
    out = {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.num_prompt_tokens,  # key names as in the gRPC response
        "completion_tokens": len(result.token_ids),
        "num_steps": result.num_steps,
        "acceptance_lengths": result.acceptance_lengths,
        "mean_acceptance_length": round(result.mean_acceptance_length, 4),
        "prefill_seconds": round(result.prefill_seconds, 4),
        "decode_seconds": round(result.decode_seconds, 4),
        "decode_tokens_per_second": round(result.decode_tokens_per_second, 3),
    }
    if result.logprobs is not None:
        out["logprobs"] = result.logprobs
    return out


def add_model_arguments(parser: argparse.ArgumentParser, allow_no_draft: bool = True) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"target model: a known name, a .gguf file or a Hugging Face folder "
        f"(default: {DEFAULT_MODEL})",
    )
    drafts = parser.add_mutually_exclusive_group()
    drafts.add_argument(
        "--draft",
        default=AUTO_DRAFT,
        help=f"draft checkpoint folder; {AUTO_DRAFT!r} (default) uses the draft shipped for the "
        f"target, or none if there is none; {RANDOM_DRAFT!r} builds a randomly initialised "
        "draft with a fixed seed",
    )
    if allow_no_draft:
        drafts.add_argument(
            "--no-draft", action="store_true", help="plain decoding with the target alone"
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
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the models run; auto (default) is cuda when there is a GPU (for serve: in "
        "the Ray cluster), else cpu",
    )


def sampling_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling fields from the command line; a prompts-file line may override each."""
    fields: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "logprobs": args.logprobs,
    }
    if args.stop:
        fields["stop"] = tuple(args.stop)
    return fields


@dataclass(frozen=True)
class PromptLine:
    """One prompt to run, or the error that rejected it before it could run."""

    request_id: str
    request: Request | None
    error: str | None = None


def read_prompt_lines(args: argparse.Namespace, target: LoadedTarget) -> list[PromptLine]:
    """Build requests from --prompt or each line of --prompts-file ({"id", "prompt", ...})."""
    defaults = sampling_defaults(args)
    if not args.prompts_file:
        lines = [{"id": "0", "prompt": args.prompt}]
    else:
        lines = []
        with open(args.prompts_file, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as error:
                    message = f"{args.prompts_file} line {number}: invalid JSON ({error})"
                    raise ValueError(message) from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(
                        f"{args.prompts_file} line {number}: expected an object with a string "
                        '"prompt" field, e.g. {"id": "a", "prompt": "Hi"}'
                    )
                lines.append({"id": str(record.get("id", number - 1)), **record})
    out = []
    for line in lines:
        request_id = str(line["id"])
        fields = {k: v for k, v in line.items() if k not in ("id", "prompt", "raw_prompt")}
        raw = bool(line.get("raw_prompt", args.no_chat_template))
        try:
            params = SamplingParams.from_dict({**defaults, **fields})
            prompt_ids = encode_prompt(target.tokenizer, line["prompt"], not raw)
        except (ValueError, TypeError) as error:
            out.append(PromptLine(request_id, None, f"invalid request: {error}"))
            continue
        out.append(PromptLine(request_id, Request(request_id, prompt_ids, params)))
    ids = [line.request_id for line in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f'{args.prompts_file}: the "id" fields must be unique')
    return out


def check_engine_options(args: argparse.Namespace) -> None:
    """Reject option values that cannot work, naming the option."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.block_size is None:
        return
    if args.no_draft:
        raise ValueError("--block-size needs a draft; remove it or drop --no-draft")
    if not 2 <= args.block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"--block-size must be between 2 and {MAX_BLOCK_SIZE}, got {args.block_size}; "
            "use --no-draft for plain decoding"
        )


def run_generate(args: argparse.Namespace) -> int:
    check_engine_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target_and_tokenizer(args.model, args.dtype, args.device)
    draft = None
    if not args.no_draft:
        draft = build_draft(
            args.draft, target, block_size=args.block_size or DEFAULT_BLOCK_SIZE, dtype=args.dtype
        )
    block_size = args.block_size or (draft.config.block_size if draft else 1)
    lines = read_prompt_lines(args, target)
    valid = [line.request for line in lines if line.request is not None]
    # Size the KV slots for the longest request that fits the model's context; longer ones are
    # rejected at submit.
    context = target.model.config.max_position_embeddings
    lengths = [len(r.prompt_ids) + r.params.max_new_tokens for r in valid]
    longest = max((n for n in lengths if n <= context), default=1)
    engine = build_engine(
        target,
        draft,
        max_seq_len=longest + block_size,
        num_slots=max(1, min(args.max_batch_size, len(valid))),
        block_size=args.block_size,
        proposal=args.proposal,
    )
    logger.info(
        "generating: model %s, draft %s, block_size %d, %d prompt(s), max_batch_size %d",
        target.folder,
        "none" if draft is None else args.draft,
        engine.block_size,
        len(lines),
        engine.num_slots,
    )
    scheduler = Scheduler(engine)
    errors = {line.request_id: line.error for line in lines if line.error}
    runnable = []
    for request in valid:
        try:
            scheduler.submit(request)
            runnable.append(request)
        except ValueError as error:
            logger.error("request %s rejected: %s", request.request_id, error)
            errors[request.request_id] = str(error)
    results = {}
    while scheduler.has_work:
        for result in scheduler.step():
            results[result.request_id] = result
    for line in lines:
        if line.request_id in errors:
            output = {"id": line.request_id, "error": errors[line.request_id]}
            print(json.dumps(output, ensure_ascii=False) if args.json else output["error"])
            continue
        result = results[line.request_id]
        if args.json:
            output = result_json(result)
            if args.prompts_file:
                output = {"id": line.request_id, **output}
            print(json.dumps(output, ensure_ascii=False))
        else:
            print(result.text)
            print(
                f"[{len(result.token_ids)} tokens, finish_reason {result.finish_reason}, "
                f"{result.num_steps} steps, mean acceptance length "
                f"{result.mean_acceptance_length:.2f}, "
                f"{result.decode_tokens_per_second:.1f} decode tokens/s]",
                file=sys.stderr,
            )
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash",
        description="DFlash block-diffusion speculative decoding: generate, benchmark, serve.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="generate completions for one prompt or a JSONL file of prompts"
    )
    prompts = generate.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a short coding request)"
    )
    prompts.add_argument(
        "--prompts-file",
        help='JSONL file, one {"id": ..., "prompt": ...} per line, optionally with sampling '
        "fields (max_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, "
        "logprobs, raw_prompt) that override the flags; prints one line per input line",
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
    generate.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"sequences decoded together (KV cache slots; default {DEFAULT_MAX_BATCH_SIZE})",
    )
    generate.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy (default 0)",
    )
    generate.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="keep the k most likely tokens; 0 keeps all (default 0)",
    )
    generate.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="keep the smallest set of tokens with this total probability (default 1.0)",
    )
    generate.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed per request (default: a fresh one each run)",
    )
    generate.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop string; the text ends before it (repeatable)",
    )
    generate.add_argument(
        "--logprobs",
        action="store_true",
        help="return the target's log-probability of each generated token",
    )
    generate.add_argument(
        "--proposal",
        choices=PROPOSAL_MODES,
        default=DEFAULT_PROPOSAL,
        help="how sampled requests pick draft tokens: argmax or sampled from the draft "
        f"(default {DEFAULT_PROPOSAL}; both are lossless)",
    )
    generate.add_argument("--json", action="store_true", help="print JSON output")
    generate.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    generate.set_defaults(run=run_generate)
    cli_training.register(commands, add_model_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Configure logging, run the parsed subcommand and turn expected errors into exit code 2."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except (ValueError, OSError, FetchError, ConversionError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
