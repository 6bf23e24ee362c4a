"""The `dflash datasets`, `datagen`, `train` and `bench` commands."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from dflash_core.bench import DEFAULT_BENCH_LIMIT, DEFAULT_BENCH_MAX_NEW_TOKENS, run_bench
from dflash_core.datasets import EVAL_DATASETS, TRAIN_DATASETS, dataset_table, load_prompts
from dflash_core.draft import default_target_layer_ids
from dflash_core.engine import DEFAULT_PROPOSAL, SpeculativeEngine
from dflash_core.fetch import DEFAULT_MODEL
from dflash_core.pipeline import (
    DEVICES,
    build_draft,
    default_mask_token_id,
    encode_prompt,
    load_target_and_tokenizer,
)
from dflash_core.sampling import PROPOSAL_MODES, SamplingParams
from dflash_core.training.data import read_sequences
from dflash_core.training.datagen import generate_responses
from dflash_core.training.target_states import StateRecorder
from dflash_core.training.trainer import (
    PRECISIONS,
    TRAIN_VOCABS,
    DraftTrainer,
    TrainConfig,
)

logger = logging.getLogger("dflash")

RESPONSES_FILE = "responses.jsonl"
DEFAULT_DATAGEN_MAX_NEW_TOKENS = 256
DEFAULT_TRAIN_MAX_LEN = 512
DEFAULTS = TrainConfig()


def run_datasets(args: argparse.Namespace) -> int:
    print(dataset_table())
    return 0


def run_datagen(args: argparse.Namespace) -> int:
    if args.tapped_layers < 0:
        raise ValueError(
            f"--tapped-layers {args.tapped_layers} is invalid: pass the number of target "
            "layers the draft will read, or 0 to save no target states"
        )
    target = load_target_and_tokenizer(args.target, device=args.device)
    prompts = []
    for name in args.datasets.split(","):
        for record in load_prompts(name, "train", args.limit):
            prompts.append((record.record_id, encode_prompt(target.tokenizer, record.turns[0])))
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    recorder = None
    if args.tapped_layers:
        layer_ids = default_target_layer_ids(target.model.config.num_layers, args.tapped_layers)
        recorder = StateRecorder(args.out, layer_ids, args.max_len)
        logger.info("recording the target states of layers %s for training", list(layer_ids))
    longest = max(len(ids) for _, ids in prompts) + params.max_new_tokens + 1
    engine = SpeculativeEngine(
        target.model,
        None,
        max_seq_len=longest,
        num_slots=args.max_batch_size,
        eos_token_ids=target.eos_token_ids,
        tap_layer_ids=recorder.layer_ids if recorder else (),
        on_tapped=recorder.add if recorder else None,
    )
    out = Path(args.out) / RESPONSES_FILE
    logger.info("generating responses for %d prompts into %s", len(prompts), out)
    written = generate_responses(engine, prompts, out, params, recorder)
    logger.info("wrote %d responses to %s", written, out)
    return 0


def find_data_file(data: Path) -> Path:
    """Return the responses file a --data entry names: a file, or a folder's responses.jsonl
    (or responses.jsonl.gz)."""
    if data.is_file():
        return data
    for name in (RESPONSES_FILE, RESPONSES_FILE + ".gz"):
        if (data / name).is_file():
            return data / name
    raise FileNotFoundError(
        f"--data {data}: no such file, and no {RESPONSES_FILE} or {RESPONSES_FILE}.gz in it; "
        "pass a `dflash datagen --out` folder or a responses file"
    )


def run_train(args: argparse.Namespace) -> int:
    target = load_target_and_tokenizer(args.target, device=args.device)
    data_files = []
    for name in args.data.split(","):
        data_files.append(find_data_file(Path(name)))
    sequences = []
    for data_file in data_files:
        sequences += read_sequences(data_file, args.max_len, features_dir=data_file.parent)
    config = TrainConfig(
        num_layers=args.layers,
        block_size=args.block_size,
        num_tapped_layers=args.tapped_layers,
        intermediate_size=args.intermediate_size,
        mask_token_id=default_mask_token_id(target.tokenizer),
        anchors_per_sequence=args.anchors,
        gamma=args.gamma,
        learning_rate=args.lr,
        epochs=args.epochs,
        sequences_per_step=args.sequences_per_step,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        train_vocab=args.train_vocab,
        precision=args.precision,
        init_from=args.init_from,
        distill_weight=args.distill_weight,
        distill_top_k=args.distill_top_k,
    )
    data_names = ", ".join(str(data_file) for data_file in data_files)
    logger.info("training on %d sequences from %s: %s", len(sequences), data_names, config)
    trainer = DraftTrainer(target.model, sequences, config, args.out)
    summary = trainer.train(stop_at_step=args.stop_at_step)
    if trainer.step < trainer.total_steps:
        logger.info(
            "stopped at step %d of %d; run the same command to resume",
            trainer.step,
            trainer.total_steps,
        )
        return 0
    summary["command"] = "dflash " + shlex.join(sys.argv[1:])
    summary["target"] = str(target.folder)
    summary["data"] = data_names
    write_model_card(Path(args.out), summary)
    return 0


def write_model_card(out: Path, summary: dict) -> None:
    """Write README.md next to the checkpoint: how it was made and how long it took."""
    config = summary["config"]
    lines = [
        "# DFlash draft",
        "",
        f"Target: `{summary['target']}`. Draft layers: {config['num_layers']}, block size "
        f"{config['block_size']}, target layers read {summary['target_layer_ids']}, mask token "
        f"id {config['mask_token_id']}.",
        "",
        f"- command: `{summary['command']}`",
        f"- data: `{summary['data']}`, {summary['sequences']} sequences",
        f"- seed {config['seed']}, {summary['epochs']} epochs, {summary['steps']} optimizer steps",
        f"- wall time {summary['wall_seconds']} s on {summary['hardware']}",
        f"- final loss {summary['final_loss']:.3f}, per-slot accuracy "
        + ", ".join(f"{a:.2f}" for a in summary["final_slot_accuracy"]),
    ]
    if summary["train_acceptance_length"] is not None:
        lines.append(
            f"- acceptance length on the training data (mean of the last "
            f"{summary['train_acceptance_steps']} steps): {summary['train_acceptance_length']}"
        )
    if config["init_from"]:
        lines.append(f"- started from the weights of `{config['init_from']}`")
    lines += [
        "",
        "Measured acceptance: run `dflash bench --draft THIS_FOLDER --dataset NAME`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def run_bench_command(args: argparse.Namespace) -> int:
    target = load_target_and_tokenizer(args.model, args.dtype, args.device)
    draft = build_draft(args.draft, target, dtype=args.dtype)
    if draft is None:
        raise ValueError("dflash bench compares a draft with plain decoding: pass --draft FOLDER")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    names = EVAL_DATASETS if args.dataset == "all" else args.dataset.split(",")
    for name in names:
        report = run_bench(
            target,
            draft,
            name,
            limit=args.limit,
            block_size=args.block_size,
            params=params,
            proposal=args.proposal,
        )
        if args.json:
            print(json.dumps(asdict(report)), flush=True)
        else:
            print(
                f"{report.dataset}: tau {report.mean_acceptance_length:.2f}, "
                f"{report.speculative_tokens_per_second:.1f} vs "
                f"{report.plain_tokens_per_second:.1f} tokens/s, speedup {report.speedup:.2f}x "
                f"({report.num_prompts} prompts, {report.identical_outputs} identical)",
                flush=True,
            )
    return 0


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the target (and the draft in training) runs; auto (default) is cuda when "
        "torch sees a GPU, else cpu",
    )


def register(commands: argparse._SubParsersAction, add_model_arguments) -> None:
    """Add the training and benchmark subcommands to the `dflash` parser."""
    datasets = commands.add_parser("datasets", help="list the prompt datasets and their splits")
    datasets.set_defaults(run=run_datasets)

    datagen = commands.add_parser(
        "datagen", help="have the target answer training prompts (resumable)"
    )
    datagen.add_argument("--target", default=DEFAULT_MODEL, help="target model spec")
    datagen.add_argument("--out", required=True, help=f"folder for {RESPONSES_FILE}")
    datagen.add_argument(
        "--datasets",
        default=",".join(TRAIN_DATASETS),
        help="comma-separated train datasets (default: all)",
    )
    datagen.add_argument(
        "--limit", type=int, default=None, help="prompts per dataset at most (default: all)"
    )
    datagen.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_DATAGEN_MAX_NEW_TOKENS,
        help=f"response length at most (default {DEFAULT_DATAGEN_MAX_NEW_TOKENS})",
    )
    datagen.add_argument(
        "--temperature", type=float, default=0.0, help="0 for greedy responses (default)"
    )
    datagen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_device_argument(datagen)
    datagen.add_argument(
        "--max-batch-size", type=int, default=8, help="responses generated together (default 8)"
    )
    datagen.add_argument(
        "--tapped-layers",
        type=int,
        default=DEFAULTS.num_tapped_layers,
        help="also save the target states of this many layers, as `dflash train "
        f"--tapped-layers` reads them, so training skips its target pass (default "
        f"{DEFAULTS.num_tapped_layers}; 0: save none)",
    )
    datagen.add_argument(
        "--max-len",
        type=int,
        default=DEFAULT_TRAIN_MAX_LEN,
        help=f"the `dflash train --max-len` the saved states are for (default "
        f"{DEFAULT_TRAIN_MAX_LEN})",
    )
    datagen.set_defaults(run=run_datagen)

    train = commands.add_parser("train", help="train a DFlash draft for a target")
    train.add_argument("--target", default=DEFAULT_MODEL, help="target model spec")
    train.add_argument(
        "--data",
        required=True,
        help=f"datagen folder or a responses file ({RESPONSES_FILE}, or .gz); a comma list "
        "trains on all of them",
    )
    train.add_argument("--out", required=True, help="checkpoint folder (resumes if present)")
    train.add_argument("--layers", type=int, default=DEFAULTS.num_layers, help="draft layers")
    train.add_argument("--block-size", type=int, default=DEFAULTS.block_size, help="block size")
    train.add_argument(
        "--tapped-layers",
        type=int,
        default=DEFAULTS.num_tapped_layers,
        help="target layers the draft reads",
    )
    train.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="draft MLP width (default: the target's)",
    )
    train.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="epochs")
    train.add_argument(
        "--anchors",
        type=int,
        default=DEFAULTS.anchors_per_sequence,
        help="blocks per sequence, re-drawn each epoch",
    )
    train.add_argument(
        "--gamma", type=float, default=None, help="slot-weight decay (default: by block size)"
    )
    train.add_argument("--lr", type=float, default=DEFAULTS.learning_rate, help="peak AdamW lr")
    train.add_argument(
        "--sequences-per-step",
        type=int,
        default=DEFAULTS.sequences_per_step,
        help="sequences per optimizer step",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULTS.checkpoint_every,
        help="optimizer steps between checkpoints",
    )
    train.add_argument(
        "--max-len", type=int, default=DEFAULT_TRAIN_MAX_LEN, help="tokens per sequence at most"
    )
    train.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed")
    add_device_argument(train)
    train.add_argument(
        "--train-vocab",
        choices=TRAIN_VOCABS,
        default=DEFAULTS.train_vocab,
        help="score the loss over the tokens in the data (default, fast on CPU) or all tokens",
    )
    train.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=DEFAULTS.precision,
        help="bfloat16 runs the forward pass under bf16 autocast, about 1.5x faster on CPUs "
        "with AVX-512 BF16 and on GPUs, but many times slower on CPUs without them "
        "(default: float32)",
    )
    train.add_argument(
        "--distill-weight",
        type=float,
        default=DEFAULTS.distill_weight,
        help="weight from 0 to 1 of a loss against the target's own top-k next-token "
        "distribution; the rest goes to the data's token (default 0: the data's token only)",
    )
    train.add_argument(
        "--distill-top-k",
        type=int,
        default=DEFAULTS.distill_top_k,
        help=f"target tokens kept per position for --distill-weight (default "
        f"{DEFAULTS.distill_top_k}); cached next to the data",
    )
    train.add_argument(
        "--init-from",
        default=None,
        metavar="DRAFT",
        help="start from this draft's weights (same --block-size and --tapped-layers; a larger "
        "--layers adds layers that start as a no-op)",
    )
    train.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="stop after this optimizer step (resume later)",
    )
    train.set_defaults(run=run_train)

    bench = commands.add_parser("bench", help="tau and speedup of the draft on eval prompts")
    bench.add_argument(
        "--dataset", default="gsm8k", help=f"{', '.join(EVAL_DATASETS)}, a comma list, or all"
    )
    add_model_arguments(bench, allow_no_draft=False)
    bench.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_BENCH_LIMIT,
        help=f"eval prompts per dataset (default {DEFAULT_BENCH_LIMIT})",
    )
    bench.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_BENCH_MAX_NEW_TOKENS,
        help=f"tokens per answer at most (default {DEFAULT_BENCH_MAX_NEW_TOKENS})",
    )
    bench.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    bench.add_argument("--seed", type=int, default=0, help="sampling seed")
    bench.add_argument(
        "--proposal",
        choices=PROPOSAL_MODES,
        default=DEFAULT_PROPOSAL,
        help="draft proposals for sampled requests",
    )
    bench.add_argument("--json", action="store_true", help="one JSON line per dataset")
    bench.set_defaults(run=run_bench_command)
