"""End-to-end checks on the real SmolLM2-135M-Instruct target."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dflash_core.pipeline import (
    build_draft,
    build_engine,
    encode_prompt,
    load_target_and_tokenizer,
    shipped_draft,
)
from dflash_core.sampling import SamplingParams
from tests.helpers import wait_for_endpoint

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_target_and_tokenizer()


@pytest.fixture(autouse=True)
def use_all_cores(threads):
    """Run this module's real-model tests on every core."""


def test_chat_prompt_uses_template(smollm2):
    ids = encode_prompt(smollm2.tokenizer, "Hi")
    text = smollm2.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system")
    assert text.endswith("<|im_start|>assistant\n")
    assert smollm2.eos_token_ids == (2,)


@pytest.mark.parametrize("block_size", [4, 16])
def test_random_draft_equals_plain_decoding(smollm2, block_size):
    draft = build_draft("random", smollm2, block_size=block_size)
    for prompt in PROMPTS:
        ids = encode_prompt(smollm2.tokenizer, prompt)
        params = SamplingParams(max_new_tokens=40)
        plain = build_engine(smollm2, None, max_seq_len=200).generate(ids, params)
        spec = build_engine(smollm2, draft, max_seq_len=200).generate(ids, params)
        assert spec.token_ids == plain.token_ids, prompt
        assert spec.finish_reason == plain.finish_reason


def test_shipped_draft_loads_by_default(smollm2):
    folder = shipped_draft(smollm2)
    assert folder is not None, "no draft ships for SmolLM2"
    assert sum(f.stat().st_size for f in folder.iterdir()) < 30 * 2**20
    draft = build_draft("auto", smollm2)
    assert draft.config.block_size == 8
    assert draft.config.draft_vocab_ids, "the shipped draft keeps its training vocabulary"
    ids = encode_prompt(smollm2.tokenizer, "Tom has 3 apples and buys 5 more. How many now?")
    params = SamplingParams(max_new_tokens=48)
    plain = build_engine(smollm2, None, max_seq_len=200).generate(ids, params)
    spec = build_engine(smollm2, draft, max_seq_len=200).generate(ids, params)
    assert spec.token_ids == plain.token_ids
    assert spec.mean_acceptance_length > 1.5, spec.acceptance_lengths


def run_dflash(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m dflash_core.cli --log-level WARNING ARGS` and capture its output."""
    command = [sys.executable, "-m", "dflash_core.cli", "--log-level", "WARNING", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def run_cli(*args: str) -> dict:
    done = run_dflash("generate", "--json", *args, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_random_draft_matches_no_draft():
    common = ["--prompt", "Name two colours.", "--max-new-tokens", "24"]
    speculative = run_cli(*common, "--draft", "random")
    plain = run_cli(*common, "--no-draft")
    assert speculative["token_ids"] == plain["token_ids"]
    assert speculative["text"] == plain["text"]
    for key in (
        "text",
        "token_ids",
        "finish_reason",
        "num_steps",
        "acceptance_lengths",
        "mean_acceptance_length",
        "decode_tokens_per_second",
    ):
        assert key in speculative, key
    assert sum(speculative["acceptance_lengths"]) == len(speculative["token_ids"]) - 1
    assert all(n == 1 for n in plain["acceptance_lengths"])


def test_cli_rejects_missing_draft(tmp_path: Path):
    done = run_dflash("generate", "--draft", str(tmp_path / "nowhere"), timeout=600)
    assert done.returncode == 2
    assert "nowhere' not found" in done.stderr


def test_cli_prompts_file_matches_single_runs(smollm2, tmp_path: Path):
    prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Say hello in Spanish.",
        "What is 12 times 12?",
        "Name a famous physicist.",
        "Translate 'cat' to French.",
        "Give one tip for clean code.",
    ]
    lines = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)]
    lines[1]["max_tokens"] = 9  # per-line fields override the flags
    lines[5]["stop"] = ["."]
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", lines)
    done = run_dflash(
        "generate",
        "--json",
        "--prompts-file",
        str(prompts_file),
        "--max-batch-size",
        "4",
        "--max-new-tokens",
        "20",
        "--block-size",
        "4",
    )
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["id"] for o in outputs] == [line["id"] for line in lines]

    draft = build_draft("random", smollm2, block_size=4)
    for line, output in zip(lines, outputs):
        params = SamplingParams.from_dict(
            {"max_new_tokens": 20, **{k: v for k, v in line.items() if k not in ("id", "prompt")}}
        )
        ids = encode_prompt(smollm2.tokenizer, line["prompt"])
        alone = build_engine(smollm2, draft, max_seq_len=120).generate(ids, params)
        assert output["token_ids"] == alone.token_ids, line["id"]
        assert output["text"] == alone.text
        assert output["finish_reason"] == alone.finish_reason
    assert len(outputs[1]["token_ids"]) <= 9
    assert "." not in outputs[5]["text"]


def test_cli_reports_bad_lines_and_runs_the_rest(tmp_path: Path):
    lines = [
        {"id": "ok", "prompt": "Hi", "max_tokens": 3},
        {"id": "bad", "prompt": "Hi", "presence_penalty": 0.5},
        {"id": "long", "prompt": "Hi", "max_tokens": 10**6},
    ]
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", lines)
    done = run_dflash("generate", "--json", "--prompts-file", str(prompts_file), "--no-draft")
    assert done.returncode == 1
    outputs = {o["id"]: o for o in map(json.loads, done.stdout.splitlines())}
    assert len(outputs["ok"]["token_ids"]) == 3
    assert "presence_penalty=0.5 is not supported" in outputs["bad"]["error"]
    assert "exceeds the model's context of 8192 tokens" in outputs["long"]["error"]


def test_bench_reports_tau_and_speedup(tmp_path: Path):
    done = run_dflash(
        "bench",
        "--draft",
        "random",
        "--block-size",
        "4",
        "--dataset",
        "gsm8k,humaneval",
        "--limit",
        "2",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["dataset"] for r in reports] == ["gsm8k", "humaneval"]
    for report in reports:
        assert report["num_prompts"] == 2
        assert report["identical_outputs"] == 2  # greedy: the draft never changes the output
        assert 1.0 <= report["mean_acceptance_length"] <= 4.0
        assert report["speedup"] > 0


def test_datasets_command_lists_splits():
    done = run_dflash("datasets", timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in done.stdout.splitlines() if line}
    assert rows["gsm8k"] == ["1187", "132"]
    assert rows["mt_bench"] == ["0", "80"]
    assert rows["math_algebra"] == ["1063", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_job_serves_what_generate_prints(tmp_path):
    """The README's main job: `dflash serve` with the default model and draft, one client call,
    the same completion as `dflash generate --json`; SIGTERM leaves no Ray process behind."""
    # A word problem, because the draft was trained on math responses and gets blocks accepted
    # there. On "What is the capital of France?" its 8-token response had none accepted.
    prompt = "Tom has 3 apples and buys 5 more. How many apples does he have?"
    grpc_port = free_port()
    serve = [sys.executable, "-m", "deployments.cli", "serve", "--grpc-port", str(grpc_port)]
    serve += ["--http-port", str(free_port())]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=log, text=True)

    try:
        wait_for_endpoint(process, f"127.0.0.1:{grpc_port}", timeout=300)
        client = [sys.executable, "-m", "deployments.cli", "client", "generate"]
        client += ["--target", f"127.0.0.1:{grpc_port}", "--prompt", prompt, "--json"]
        done = subprocess.run(client, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        served = json.loads(done.stdout)

        ray_processes = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert [p.name() for p in alive] == []
    finally:
        if process.poll() is None:
            process.kill()
        log.close()

    local = run_cli("--prompt", prompt)
    assert [int(t) for t in served["token_ids"]] == local["token_ids"]
    assert served["text"] == local["text"]
    assert served["prompt_tokens"] == local["prompt_tokens"]
    assert served["completion_tokens"] == local["completion_tokens"]
    # The shipped draft is in use on both paths: blocks of more than one token get accepted.
    assert served["acceptance"]["mean_acceptance_length"] > 1.0
    assert local["mean_acceptance_length"] > 1.0
