"""The `dflash` command line: the core commands plus `serve` and `client`.

Ray and gRPC are imported inside the `serve` and `client` handlers only, so `dflash generate`
and the other core commands start without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from deployments.schemas import DEFAULT_TRANSPORT, TRANSPORTS
from deployments.server import DEFAULT_GRPC_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT
from dflash_core import cli as core_cli

logger = logging.getLogger("dflash")

DEFAULT_CLIENT_TIMEOUT_SECONDS = 600.0


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the model over gRPC with Ray Serve until SIGINT or SIGTERM"
    )
    core_cli.add_model_arguments(serve)
    add_engine_arguments(serve.add_argument_group("engine replicas"))
    add_listen_arguments(serve.add_argument_group("cluster and network"))
    serve.set_defaults(run=run_serve)


def add_engine_arguments(engine: argparse._ArgumentGroup) -> None:
    engine.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel ranks of the target, at most its key/value heads (default 1). "
        "Ranks 1 and up run in verifier actors",
    )
    engine.add_argument(
        "--verifier-num-cpus",
        type=float,
        default=None,
        help="CPUs Ray reserves per verifier actor with --tp 2 or more (default: the engine's)",
    )
    engine.add_argument(
        "--colocated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the draft in the engine replica's process (default) or, with --no-colocated, "
        "in a drafter actor in the replica's placement group",
    )
    engine.add_argument(
        "--drafter-num-cpus",
        type=float,
        default=None,
        help="CPUs Ray reserves per drafter actor with --no-colocated (default 1)",
    )
    engine.add_argument(
        "--drafter-transport",
        choices=TRANSPORTS,
        default=None,
        help=f"per-step calls to the drafter actor with --no-colocated: plain actor calls or a "
        f"Ray Compiled Graph (default {DEFAULT_TRANSPORT}, faster on CPU)",
    )
    engine.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="sequences one engine replica decodes together "
        f"(default {core_cli.DEFAULT_MAX_BATCH_SIZE})",
    )
    engine.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="tokens per KV cache slot (default: the model's context)",
    )
    engine.add_argument(
        "--min-replicas",
        type=int,
        default=None,
        help="minimum number of engine replicas (default 1)",
    )
    engine.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        help="maximum number of engine replicas (default 1)",
    )
    engine.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="ongoing requests per engine replica that autoscaling aims for (default: max batch size)",
    )
    engine.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests one engine replica accepts at once (default: twice the max batch size)",
    )
    engine.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests queued per ingress replica before RESOURCE_EXHAUSTED; -1 is unlimited",
    )
    engine.add_argument(
        "--engine-num-cpus", type=float, default=None, help="CPUs Ray reserves per engine replica"
    )
    engine.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per engine replica (default: its CPUs)",
    )


def add_listen_arguments(listen: argparse._ArgumentGroup) -> None:
    listen.add_argument(
        "--grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help=f"gRPC port (default {DEFAULT_GRPC_PORT})",
    )
    listen.add_argument(
        "--http-port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help=f"port of Serve's HTTP proxy, which this app does not use yet (default {DEFAULT_HTTP_PORT})",
    )
    listen.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"interface the gRPC and HTTP proxies listen on (default {DEFAULT_HOST}; 0.0.0.0 for all)",
    )
    listen.add_argument(
        "--address",
        default=None,
        help="address of a running Ray cluster; without it a local cluster is started",
    )
    listen.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs of the local cluster (default: what the ingress and the max replicas need)",
    )


def add_client_parser(commands: argparse._SubParsersAction) -> None:
    client = commands.add_parser("client", help="call a running dflash gRPC service")
    client_commands = client.add_subparsers(dest="client_command", required=True)
    generate = client_commands.add_parser("generate", help="generate a completion")
    generate.add_argument("--target", required=True, help="service address, HOST:PORT")
    generate.add_argument("--prompt", required=True, help="prompt text")
    generate.add_argument(
        "--raw-prompt", action="store_true", help="send the prompt without the chat template"
    )
    generate.add_argument("--stream", action="store_true", help="print the text as it arrives")
    generate.add_argument(
        "--json", action="store_true", help="print the response (each chunk with --stream) as JSON"
    )
    generate.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    generate.add_argument(
        "--top-k", type=int, default=0, help="most likely tokens kept; 0 keeps all"
    )
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--request-id", default=None, help="request id for the server's logs")
    generate.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CLIENT_TIMEOUT_SECONDS,
        help=f"seconds to wait for the result (default {DEFAULT_CLIENT_TIMEOUT_SECONDS:g})",
    )
    generate.set_defaults(run=run_client_generate)


def parse_app_args(app_args_type: type, fields: dict) -> object:
    """Build AppArgs, turning pydantic's report into one line per option the user passed."""
    import pydantic

    try:
        return app_args_type(**fields)
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            if not item["loc"]:  # a check across several options
                problems.append(item["msg"])
                continue
            name = ".".join(str(part) for part in item["loc"])
            value = fields.get(name, item.get("input"))
            problems.append(f"--{name.replace('_', '-')} {value}: {item['msg']}")
        raise ValueError("invalid serve options: " + "; ".join(problems)) from None


def run_serve(args: argparse.Namespace) -> int:
    from deployments import server
    from deployments.app import AppArgs

    fields = {
        "model": args.model,
        "draft": None if args.no_draft else args.draft,
        "tp": args.tp,
        "colocated": args.colocated,
        "block_size": args.block_size,
        "max_batch_size": args.max_batch_size,
        "max_seq_len": args.max_seq_len,
        "dtype": args.dtype,
        "device": args.device,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests,
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        "engine_num_cpus": args.engine_num_cpus,
        "drafter_num_cpus": args.drafter_num_cpus,
        "drafter_transport": args.drafter_transport,
        "verifier_num_cpus": args.verifier_num_cpus,
        "threads": args.threads,
        "log_level": args.log_level,
    }
    # Options left unset take the AppArgs defaults, so each default is defined once.
    app_args = parse_app_args(AppArgs, {name: v for name, v in fields.items() if v is not None})
    options = server.ServeOptions(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        host=args.host,
        address=args.address,
        num_cpus=args.num_cpus,
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    try:
        server.start(app_args, options)
        # Installed after ray.init, which replaces the SIGTERM handler with one that aborts.
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        print(
            f"dflash gRPC endpoint: {args.host}:{args.grpc_port} (application dflash)", flush=True
        )
        while not stop.wait(timeout=1.0):
            pass
    finally:
        server.shutdown()
    logger.info("shut down")
    return 0


# Largest value of each unsigned integer field of GenerateRequest (uint32 or uint64).
UNSIGNED_FIELD_MAX = {"max_tokens": (1 << 32) - 1, "top_k": (1 << 32) - 1, "seed": (1 << 64) - 1}


def run_client_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from deployments.client import DFlashClient
    from deployments.protos import dflash_pb2

    request = dflash_pb2.GenerateRequest(
        prompt=args.prompt, raw_prompt=args.raw_prompt, stop=args.stop
    )
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "request_id"):
        value = getattr(args, name)
        if value is None:
            continue
        if name in UNSIGNED_FIELD_MAX and not 0 <= value <= UNSIGNED_FIELD_MAX[name]:
            # protobuf would reject it with "Value out of range", naming neither option nor range.
            raise ValueError(
                f"--{name.replace('_', '-')} {value} is out of range; pass a value from 0 to "
                f"{UNSIGNED_FIELD_MAX[name]}"
            )
        setattr(request, name, value)

    def as_json(message: object) -> str:
        fields = MessageToDict(message, preserving_proto_field_name=True)
        return json.dumps(fields, ensure_ascii=False)

    with DFlashClient(args.target) as client:
        try:
            if not args.stream:
                response = client.generate(request, timeout=args.timeout)
                print(as_json(response) if args.json else response.text)
                return 0
            for chunk in client.generate_stream(request, timeout=args.timeout):
                if args.json:
                    print(as_json(chunk), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print()
            return 0
        except grpc.RpcError as error:
            logger.error("request failed: %s: %s", error.code().name, error.details())
            return 1


def build_parser() -> argparse.ArgumentParser:
    parser = core_cli.build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    add_serve_parser(commands)
    add_client_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return core_cli.run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
