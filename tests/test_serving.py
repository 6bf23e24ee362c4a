"""The Ray Serve deployment over gRPC, on a local Ray cluster with a tiny random target.

The target is a random 2-layer Llama with the SmolLM2 tokenizer (vocabulary 49152). Its LM
head rows are permuted so that it often emits tokens of multi-byte characters, some of them
partial UTF-8 sequences, which exercises the streamed text deltas. Greedy output through the
service must equal plain greedy decoding with dflash_core in this process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from transformers import AutoTokenizer

from deployments import cli
from deployments.app import AppArgs, placement_bundles
from deployments.client import DFlashClient
from deployments.engine import EngineConfig, encode_request
from deployments.engine_loop import EngineLoop
from deployments.protos import dflash_pb2
from deployments.schemas import (
    EngineStepError,
    EngineStoppedError,
    GenerationRequest,
    InvalidRequestError,
)
from deployments.verifier import verifier_bundle_index
from dflash_core.fetch import DEFAULT_MODEL, resolve_model
from dflash_core.pipeline import build_engine, encode_prompt, load_target_and_tokenizer
from dflash_core.sampling import SamplingParams
from dflash_core.scheduler import Scheduler
from tests.helpers import save_random_hf_model, wait_for_endpoint

VOCAB = 49152
MAX_TOKENS = 24
MAX_SEQ_LEN = 516  # the tiny target's context (512) plus the block size (4)
PROMPTS = ["Hello", "Write a haiku about the sea.", "日本語で答えて", "café au lait"]
MULTI_BYTE_TEXT = "日本語のテキスト 😊🚀 café naïve Ωμέγα"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)
APP = dict(
    draft="random",
    block_size=4,
    max_batch_size=2,
    max_seq_len=MAX_SEQ_LEN,
    max_ongoing_requests=3,
    max_queued_requests=4,
    engine_num_cpus=0.1,
    ingress_num_cpus=0.1,
    threads=1,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """Save the tiny target with its LM head rows swapped toward multi-byte tokens."""
    folder = tmp_path_factory.mktemp("serving-target")
    source = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = save_random_hf_model(folder, "llama", vocab_size=VOCAB, num_hidden_layers=2)
    # Give the rows of the tokens this model emits most to multi-byte tokens, so greedy
    # output is full of them while still varying from prompt to prompt.
    counts: Counter[int] = Counter()
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            output = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            counts.update(output[0, ids.shape[1] :].tolist())
        multi_byte = sorted(set(tokenizer.encode(MULTI_BYTE_TEXT, add_special_tokens=False)))
        frequent = [token for token, _ in counts.most_common() if token not in multi_byte]
        weight = model.lm_head.weight
        for common, rare in zip(frequent, multi_byte):
            weight[[common, rare]] = weight[[rare, common]]
    model.save_pretrained(folder)  # rewrites generation_config.json, so copy after
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference(model_folder):
    """Plain greedy decoding (no draft) of each prompt with dflash_core in this process."""
    target = load_target_and_tokenizer(str(model_folder))
    engine = build_engine(target, None, max_seq_len=MAX_SEQ_LEN)
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    return {
        prompt: engine.generate(encode_prompt(target.tokenizer, prompt), params)
        for prompt in PROMPTS
    }


@pytest.fixture(scope="module")
def service(model_folder):
    """Start a 2-CPU local Ray cluster with the app; yields a client and the cluster's pids."""
    from deployments import server

    args = AppArgs(model=str(model_folder), **APP)
    options = server.ServeOptions(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
    server.start(args, options)
    client = DFlashClient(f"127.0.0.1:{options.grpc_port}")
    client.wait_until_ready(timeout=60)
    ray_processes = psutil.Process().children(recursive=True)
    yield client, ray_processes
    client.close()
    server.shutdown()


def request(prompt: str, **fields) -> dflash_pb2.GenerateRequest:
    return dflash_pb2.GenerateRequest(prompt=prompt, **{"max_tokens": MAX_TOKENS, **fields})


def stream_all(client: DFlashClient, message: dflash_pb2.GenerateRequest) -> list:
    return list(client.generate_stream(message, timeout=120))


@pytest.mark.slow
def test_generate_matches_core_greedy(service, reference):
    client, _ = service
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: client.generate(request(p), timeout=120), PROMPTS))
    for prompt, response in zip(PROMPTS, responses):
        expected = reference[prompt]
        assert list(response.token_ids) == expected.token_ids, prompt
        assert response.text == expected.text, prompt
        assert response.finish_reason == expected.finish_reason
        assert response.completion_tokens == len(expected.token_ids)
        assert response.prompt_tokens == expected.num_prompt_tokens
        assert response.acceptance.num_steps == len(response.acceptance.acceptance_lengths)
        assert sum(response.acceptance.acceptance_lengths) == len(expected.token_ids) - 1


@pytest.mark.slow
def test_stream_deltas_concatenate_to_unary(service, reference):
    client, _ = service
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = list(pool.map(lambda p: stream_all(client, request(p)), PROMPTS))
    texts = []
    for prompt, chunks in zip(PROMPTS, streams):
        expected = reference[prompt]
        text = "".join(chunk.text for chunk in chunks)
        token_ids = [token for chunk in chunks for token in chunk.token_ids]
        assert text == expected.text, prompt
        assert token_ids == expected.token_ids, prompt
        assert [chunk.finish_reason for chunk in chunks[:-1]] == [""] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == expected.finish_reason
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
        assert chunks[-1].usage.prompt_tokens == expected.num_prompt_tokens
        assert len(chunks) > 2, "expected the output in several chunks"
        texts.append(text)
    # The LM head permutation must put multi-byte characters into the output, or this test
    # would not cover them.
    assert any(ord(char) > 127 and char != "\ufffd" for char in "".join(texts))


@pytest.mark.slow
def test_stop_string_cuts_stream_and_unary(service, reference):
    client, _ = service
    prompt = PROMPTS[1]
    full_text = reference[prompt].text
    stop = full_text[6:9]
    message = request(prompt, stop=[stop])
    response = client.generate(message, timeout=120)
    chunks = stream_all(client, message)
    assert response.text == full_text[: full_text.find(stop)]
    assert response.finish_reason == "stop"
    assert "".join(chunk.text for chunk in chunks) == response.text
    assert [t for chunk in chunks for t in chunk.token_ids] == list(response.token_ids)


@pytest.mark.slow
def test_messages_equal_chat_prompt(service, reference):
    client, _ = service
    message = dflash_pb2.GenerateRequest(
        messages=[dflash_pb2.ChatMessage(role="user", content=PROMPTS[0])],
        max_tokens=MAX_TOKENS,
    )
    response = client.generate(message, timeout=120)
    assert list(response.token_ids) == reference[PROMPTS[0]].token_ids


INVALID_REQUESTS = {
    "presence_penalty": (request("Hi", presence_penalty=0.5), "presence_penalty"),
    "empty prompt": (dflash_pb2.GenerateRequest(prompt=""), "empty"),
    "too long": (request("Hi", max_tokens=100_000), "exceeds"),
    "top_p above 1": (request("Hi", top_p=2.0), "top_p"),
    "prompt and messages": (
        request("Hi", messages=[dflash_pb2.ChatMessage(role="user", content="Hi")]),
        "exactly one",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(INVALID_REQUESTS))
def test_invalid_request_is_invalid_argument(service, case):
    client, _ = service
    message, expected_detail = INVALID_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as unary:
        client.generate(message, timeout=60)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected_detail in unary.value.details()
    with pytest.raises(grpc.RpcError) as streamed:
        stream_all(client, message)
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected_detail in streamed.value.details()


@pytest.mark.slow
def test_overload_is_resource_exhausted(service):
    """Requests past max_ongoing_requests + max_queued_requests are rejected, not queued."""
    client, _ = service
    num_requests = 16  # capacity: 3 ongoing + 4 queued

    def call(index: int) -> tuple[grpc.StatusCode, float]:
        began = time.monotonic()
        try:
            client.generate(request(f"overload {index}", max_tokens=120), timeout=120)
            return grpc.StatusCode.OK, time.monotonic() - began
        except grpc.RpcError as error:
            return error.code(), time.monotonic() - began

    with ThreadPoolExecutor(num_requests) as pool:
        outcomes = list(pool.map(call, range(num_requests)))
    codes = Counter(code for code, _ in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 1, codes
    assert codes[grpc.StatusCode.OK] >= 3, codes
    rejected_seconds = [s for code, s in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert max(rejected_seconds) < 5.0, f"rejections took {rejected_seconds} s"


@pytest.mark.slow
def test_cancelled_stream_frees_engine(service):
    """Cancelling the engine call (as the ingress does when its caller goes away) frees the slot.

    The call is made through the engine's handle: ray.serve 2.60's gRPC proxy does not always
    cancel the replica call when a gRPC client cancels a stream.
    """
    from ray import serve

    engine = serve.get_deployment_handle("DFlashEngine", app_name="dflash")
    cancelled_before = engine.stats.remote().result()["num_cancelled"]
    long_request = GenerationRequest(request_id="to-cancel", prompt="A story", max_tokens=440)
    chunks = engine.options(stream=True).generate_stream.remote(long_request)
    first = next(chunks)
    assert first.result is None, "the request finished before it could be cancelled"
    chunks.cancel()
    deadline = time.monotonic() + 20
    while engine.stats.remote().result()["num_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = engine.stats.remote().result()
    assert stats["num_requests"] == 0
    assert stats["num_cancelled"] == cancelled_before + 1


@pytest.mark.slow
def test_client_cli_generate(service, reference, capsys):
    client, _ = service
    expected = reference[PROMPTS[2]]
    common = ["client", "generate", "--target", client.target, "--prompt", PROMPTS[2]]
    common += ["--max-tokens", str(MAX_TOKENS)]
    assert cli.main([*common, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["token_ids"] == expected.token_ids
    assert printed["text"] == expected.text
    assert cli.main([*common, "--stream"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"


@pytest.mark.slow
def test_shutdown_leaves_no_ray_processes(service):
    """Runs last in this module: it shuts the service down."""
    from deployments import server

    _, ray_processes = service
    names = {process.name() for process in ray_processes}
    assert {"raylet", "gcs_server"} <= names, names
    server.shutdown()
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert [process.name() for process in alive] == []


@pytest.mark.slow
def test_serve_cli_stops_cleanly_on_sigterm(model_folder, reference, tmp_path):
    """Runs after the service fixture shut down, so only this cluster is up."""
    grpc_port = free_port()
    command = [sys.executable, "-m", "deployments.cli", "serve", "--model", str(model_folder)]
    command += ["--block-size", "4", "--max-batch-size", "2", "--max-seq-len", str(MAX_SEQ_LEN)]
    command += ["--engine-num-cpus", "0.1", "--num-cpus", "2", "--grpc-port", str(grpc_port)]
    command += ["--http-port", str(free_port())]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        wait_for_endpoint(process, f"127.0.0.1:{grpc_port}", timeout=120)
        with DFlashClient(f"127.0.0.1:{grpc_port}") as client:
            client.wait_until_ready(timeout=60)
            response = client.generate(request(PROMPTS[0]), timeout=120)
        assert list(response.token_ids) == reference[PROMPTS[0]].token_ids
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert [p.name() for p in alive] == []
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def actor_processes(class_name: str) -> list[psutil.Process]:
    """Ray worker processes of one actor class, found by the title Ray gives them."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(f"ray::{class_name}" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["actor", "compiled"])
def test_drafter_actor_in_placement_group(model_folder, reference, transport):
    """A replica with a drafter actor gives the same greedy tokens with either transport.

    Deleting the app stops the drafter actor.
    """
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group_table

    from deployments import server

    overrides = {"colocated": False, "drafter_num_cpus": 0.1, "drafter_transport": transport}
    args = AppArgs(model=str(model_folder), **{**APP, **overrides})
    options = server.ServeOptions(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
    server.start(args, options)
    try:
        with DFlashClient(f"127.0.0.1:{options.grpc_port}") as client:
            client.wait_until_ready(timeout=60)
            with ThreadPoolExecutor(2) as pool:
                responses = list(
                    pool.map(lambda p: client.generate(request(p), timeout=120), PROMPTS[:2])
                )
        for prompt, response in zip(PROMPTS, responses):
            assert list(response.token_ids) == reference[prompt].token_ids, prompt
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        bundles = [list(g["bundles"].values()) for g in groups]
        assert [{"CPU": 0.1}, {"CPU": 0.1}] in bundles, bundles
        assert ray.is_initialized()
        drafters = actor_processes("DrafterActor")
        assert len(drafters) == 1, drafters
        serve.delete("dflash")
        _, alive = psutil.wait_procs(drafters, timeout=30)
        assert alive == []
    finally:
        server.shutdown()


@pytest.mark.slow
def test_tensor_parallel_engine_matches_core(model_folder, reference):
    """An engine replica with tp=2 (itself rank 0, one verifier actor) and a drafter actor gives
    the same greedy tokens, and deleting the app stops the verifier actor."""
    from ray import serve
    from ray.util.placement_group import placement_group_table

    from deployments import server

    overrides = {"tp": 2, "verifier_num_cpus": 0.1, "colocated": False, "drafter_num_cpus": 0.1}
    args = AppArgs(model=str(model_folder), **{**APP, **overrides})
    options = server.ServeOptions(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
    server.start(args, options)
    try:
        with DFlashClient(f"127.0.0.1:{options.grpc_port}") as client:
            client.wait_until_ready(timeout=60)
            with ThreadPoolExecutor(3) as pool:
                responses = list(
                    pool.map(lambda p: client.generate(request(p), timeout=120), PROMPTS[:3])
                )
        for prompt, response in zip(PROMPTS, responses):
            assert list(response.token_ids) == reference[prompt].token_ids, prompt
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        bundles = [list(g["bundles"].values()) for g in groups]
        assert [{"CPU": 0.1}, {"CPU": 0.1}, {"CPU": 0.1}] in bundles, bundles
        verifiers = actor_processes("VerifierActor")
        assert len(verifiers) == 1, verifiers
        serve.delete("dflash")
        _, alive = psutil.wait_procs(verifiers, timeout=30)
        assert alive == []
    finally:
        server.shutdown()


def test_tensor_parallel_rejects_tp_above_kv_heads(model_folder):
    """Checked before any actor starts, so no Ray cluster is needed to see the error."""
    from deployments.engine import load_engine

    config = EngineConfig(model=str(model_folder), draft=None, tp=3, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="tp=3 is larger than the target's 2 key/value heads"):
        load_engine(config)


def test_serve_cli_rejects_tp_above_kv_heads(model_folder, caplog):
    """A local cluster checks tp before starting Ray, so the error comes at once."""
    import ray

    command = ["serve", "--model", str(model_folder), "--tp", "3"]
    command += ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    assert cli.main(command) == 2
    assert "tp=3 is larger than the target's 2 key/value heads" in caplog.text
    assert not ray.is_initialized()


def test_serve_cli_names_bad_options(caplog):
    assert cli.main(["serve", "--tp", "0", "--max-batch-size", "-1"]) == 2
    assert "invalid serve options: " in caplog.text
    assert "--tp 0: Input should be greater than or equal to 1" in caplog.text
    assert "--max-batch-size -1: Input should be greater than or equal to 1" in caplog.text
    assert "errors.pydantic.dev" not in caplog.text


@pytest.mark.parametrize(
    "option, value, limit",
    [("--max-tokens", "-5", 2**32 - 1), ("--top-k", "-1", 2**32 - 1), ("--seed", "-1", 2**64 - 1)],
)
def test_client_cli_names_out_of_range_option(caplog, option, value, limit):
    """Checked before any call, so no server is needed."""
    command = ["client", "generate", "--target", "127.0.0.1:1", "--prompt", "hi", option, value]
    assert cli.main(command) == 2
    assert f"{option} {value} is out of range; pass a value from 0 to {limit}" in caplog.text


@pytest.mark.slow
def test_local_cluster_start_retries_start_timeouts(monkeypatch, caplog):
    """A GCS port-file timeout and a raylet registration timeout each fail one start, and the
    third start runs. A fourth is allowed here in case the real start times out on a loaded
    machine."""
    import ray

    from deployments import server

    real_init = ray.init
    injected = [
        RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y"),
        Exception("The current node timed out during startup. This could happen because ..."),
    ]
    calls = []

    def init_failing_twice(**kwargs):
        calls.append(kwargs)
        if len(calls) <= len(injected):
            raise injected[len(calls) - 1]
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", init_failing_twice)
    monkeypatch.setattr(server, "LOCAL_START_ATTEMPTS", 4)
    server.start_local_cluster(num_cpus=1, num_gpus=0, runtime_env={})
    try:
        assert len(calls) >= 3
        assert ray.is_initialized()
        assert "(attempt 1 of 4): Timed out waiting for file" in caplog.text
        assert "(attempt 2 of 4): The current node timed out during startup" in caplog.text
    finally:
        server.shutdown()
    assert not ray.is_initialized()


def test_failed_start_stops_processes(monkeypatch):
    """Processes that a failed ray.init left behind are stopped at once, not after the 30 s
    that a shutdown waits for a cluster's processes to exit by themselves."""
    import ray

    from deployments import server

    left = []

    def init_leaving_a_process(**kwargs):
        left.append(subprocess.Popen(["sleep", "600"]))
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", init_leaving_a_process)
    monkeypatch.setattr(server, "LOCAL_START_ATTEMPTS", 1)
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out during startup"):
        server.start_local_cluster(num_cpus=1, num_gpus=0, runtime_env={})
    # psutil reaps the process, so Popen gets no exit status. The test checks that it exited in time.
    assert left[0].poll() is not None
    assert time.monotonic() - started < server.LOCAL_EXIT_TIMEOUT_S / 2


def test_local_cluster_start_does_not_retry_other_errors(monkeypatch):
    import ray

    from deployments import server

    calls = []

    def init_failing(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("some other start failure")

    monkeypatch.setattr(ray, "init", init_failing)
    with pytest.raises(RuntimeError, match="some other start failure"):
        server.start_local_cluster(num_cpus=1, num_gpus=0, runtime_env={})
    assert len(calls) == 1


def test_app_args_reject_tp_zero():
    with pytest.raises(ValueError, match="tp"):
        AppArgs(tp=0)


def test_placement_bundles_order():
    args = AppArgs(
        tp=3, colocated=False, engine_num_cpus=1, drafter_num_cpus=0.5, verifier_num_cpus=0.2
    )
    assert placement_bundles(args) == [{"CPU": 1}, {"CPU": 0.5}, {"CPU": 0.2}, {"CPU": 0.2}]
    assert [verifier_bundle_index(rank, separate_drafter=True) for rank in (1, 2)] == [2, 3]
    colocated = AppArgs(tp=2, engine_num_cpus=0.5)
    assert placement_bundles(colocated) == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert verifier_bundle_index(1, separate_drafter=False) == 1


def test_cuda_bundles_hold_one_gpu_each():
    from deployments.app import resolve_device

    args = AppArgs(tp=2, colocated=False, engine_num_cpus=1, drafter_num_cpus=0.5, device="cuda")
    assert resolve_device(args) == "cuda"
    assert placement_bundles(args, "cuda") == [
        {"CPU": 1, "GPU": 1},
        {"CPU": 0.5, "GPU": 1},
        {"CPU": 1, "GPU": 1},
    ]
    # A colocated draft shares the replica's GPU.
    colocated = AppArgs(tp=2, engine_num_cpus=1)
    assert placement_bundles(colocated, "cuda") == [{"CPU": 1, "GPU": 1}] * 2
    # "auto" without a Ray cluster (or on one without GPUs) is the CPU.
    assert resolve_device(AppArgs()) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_local_cluster_gpus_follow_torch():
    from deployments.server import local_cluster_gpus

    assert local_cluster_gpus("cpu") == 0
    assert local_cluster_gpus("auto") == 0  # Ray would count GPUs that torch cannot use
    with pytest.raises(ValueError, match="device cuda was requested but torch"):
        local_cluster_gpus("cuda")


@pytest.mark.slow
def test_engine_autoscales_under_load(model_folder):
    """Long requests above target_ongoing_requests bring up the second engine replica."""
    from ray import serve

    from deployments import server

    overrides = {"max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0}
    args = AppArgs(model=str(model_folder), **{**APP, **overrides, "max_queued_requests": -1})
    options = server.ServeOptions(grpc_port=free_port(), http_port=free_port(), num_cpus=2)
    server.start(args, options)
    streams = []
    try:
        client = DFlashClient(f"127.0.0.1:{options.grpc_port}")
        client.wait_until_ready(timeout=60)
        for index in range(4):
            stream = client.generate_stream(request(f"load {index}", max_tokens=440))
            streams.append(stream)
        running = 0
        deadline = time.monotonic() + 90
        while running < 2 and time.monotonic() < deadline:
            engine_status = serve.status().applications["dflash"].deployments["DFlashEngine"]
            running = engine_status.replica_states.get("RUNNING", 0)
            time.sleep(0.5)
        assert running == 2
    finally:
        for stream in streams:
            stream.cancel()
        server.shutdown()


# ---- the engine loop alone, without Ray ---------------------------------------------------


@pytest.fixture(scope="module")
def loaded_target(model_folder):
    return load_target_and_tokenizer(str(model_folder))


def run_stream(loop: EngineLoop, request_id: str, make_request) -> list:
    async def collect():
        return [chunk async for chunk in loop.stream(request_id, make_request)]

    return asyncio.run(collect())


def core_request(target, prompt: str, request_id: str = "r"):
    from dflash_core.scheduler import Request

    return Request(
        request_id,
        encode_prompt(target.tokenizer, prompt),
        SamplingParams(max_new_tokens=MAX_TOKENS),
    )


def test_engine_loop_failed_step_fails_requests(loaded_target, reference):
    engine = build_engine(loaded_target, None, max_seq_len=MAX_SEQ_LEN, num_slots=2)
    step = engine.step
    calls = []

    def failing_step(running):
        calls.append(len(running))
        if len(calls) == 2:
            raise RuntimeError("simulated step failure")
        step(running)

    engine.step = failing_step
    loop = EngineLoop(Scheduler(engine))
    try:
        with pytest.raises(EngineStepError, match="simulated step failure"):
            run_stream(loop, "a", lambda: core_request(loaded_target, PROMPTS[0], "a"))
        assert sorted(engine.free_slots) == [0, 1]
        # The loop keeps serving after a failed step.
        chunks = run_stream(loop, "b", lambda: core_request(loaded_target, PROMPTS[0], "b"))
        assert chunks[-1].result.token_ids == reference[PROMPTS[0]].token_ids
    finally:
        loop.stop()


def test_engine_loop_idle_hook_once_per_pause(loaded_target, reference):
    engine = build_engine(loaded_target, None, max_seq_len=MAX_SEQ_LEN)
    idle_calls = []  # whether the scheduler had work at each call

    def wait_for_calls(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(idle_calls) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(idle_calls) == count

    scheduler = Scheduler(engine)
    loop = EngineLoop(
        scheduler, on_idle=lambda: idle_calls.append(scheduler.has_work), idle_seconds=0.2
    )
    try:
        wait_for_calls(1)  # idle from the start
        for round_index, rid in enumerate(("a", "b")):
            chunks = run_stream(loop, rid, lambda r=rid: core_request(loaded_target, PROMPTS[0], r))
            assert chunks[-1].result.token_ids == reference[PROMPTS[0]].token_ids
            wait_for_calls(round_index + 2)
            time.sleep(0.6)  # no second call within one idle stretch
            assert len(idle_calls) == round_index + 2
        assert idle_calls == [False, False, False]
    finally:
        loop.stop()


def test_engine_loop_rejects_bad_request(loaded_target):
    engine = build_engine(loaded_target, None, max_seq_len=MAX_SEQ_LEN)
    loop = EngineLoop(Scheduler(engine))

    def make_request():
        bad = GenerationRequest(request_id="x", prompt="", max_tokens=4)
        encode_request(loaded_target.tokenizer, bad)

    try:
        with pytest.raises(InvalidRequestError, match="empty"):
            run_stream(loop, "x", make_request)
        loop.check_alive()
    finally:
        loop.stop()


def test_engine_config_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=1)


# ---- the command line ---------------------------------------------------------------------


def test_cli_starts_without_ray():
    code = (
        "import sys, deployments.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('ray', 'grpc') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


class LoopCrash(BaseException):
    """Not an Exception, so the loop's per-step handler lets it end the loop thread."""


def test_engine_loop_crash_fails_requests(loaded_target):
    engine = build_engine(loaded_target, None, max_seq_len=MAX_SEQ_LEN)

    def crashing_step(running):
        raise LoopCrash("simulated crash")

    engine.step = crashing_step
    loop = EngineLoop(Scheduler(engine))
    try:
        with pytest.raises(EngineStoppedError):
            run_stream(loop, "a", lambda: core_request(loaded_target, PROMPTS[0], "a"))
        with pytest.raises(EngineStoppedError):
            loop.check_alive()
    finally:
        loop.stop()


def test_status_for_maps_errors():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from deployments.ingress import status_for

    wrapped = RayTaskError(
        "generate", "traceback", InvalidRequestError("bad")
    ).as_instanceof_cause()
    cases = [
        (InvalidRequestError("empty prompt"), grpc.StatusCode.INVALID_ARGUMENT),
        (wrapped, grpc.StatusCode.INVALID_ARGUMENT),
        (
            BackPressureError(num_queued_requests=2, max_queued_requests=2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (EngineStoppedError("stopped"), grpc.StatusCode.UNAVAILABLE),
        (EngineStepError("step failed"), grpc.StatusCode.INTERNAL),
        (ValueError("a bug, not the client's fault"), grpc.StatusCode.INTERNAL),
    ]
    for error, expected in cases:
        code, message = status_for(error)
        assert code == expected, f"{error!r}: {code}"
        assert message, f"{error!r}: empty message"
    assert status_for(wrapped)[1] == "bad"


def test_same_grpc_and_http_port_is_rejected():
    from deployments import server

    with pytest.raises(ValueError, match="ports are both 9000; pass different --grpc-port"):
        server.ServeOptions(grpc_port=9000, http_port=9000)
