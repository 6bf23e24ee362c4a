"""The gRPC ingress: `DFlashService` methods served through Ray Serve's gRPC proxy.

The ingress is stateless. It converts each protobuf request to a `GenerationRequest`, calls an
engine replica through a DeploymentHandle (streaming for GenerateStream) and converts the
output back. Every error is mapped to a gRPC status code here, once:

  INVALID_ARGUMENT    the request can never run (bad option, empty or too long prompt)
  RESOURCE_EXHAUSTED  the engine's queue is full (Serve's max_queued_requests); retry later
  UNAVAILABLE         no engine replica can take the request, or its loop stopped
  INTERNAL            a decode step failed, or any other error
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
import pydantic
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from deployments.logs import configure_worker_logging
from deployments.protos import dflash_pb2
from deployments.schemas import (
    ChatMessage,
    EngineStepError,
    EngineStoppedError,
    GenerationRequest,
    InvalidRequestError,
)
from dflash_core.sequence import GenerationResult

logger = logging.getLogger(__name__)


class RequestFailed(Exception):
    """Ends a stream whose gRPC status code and details are already set on the context.

    Serve's replica finds the code on the context and sends it to the client in place of
    INTERNAL (ray.serve 2.60 wraps the error in gRPCStatusError for its proxy).
    """


def to_generation_request(request: dflash_pb2.GenerateRequest) -> GenerationRequest:
    """Convert a protobuf request; unset optional fields stay None (the server's defaults).

    proto3 cannot tell an empty prompt from an unset one, so a request without messages has
    a prompt, maybe empty, which the engine then rejects.
    """
    return GenerationRequest(
        request_id=request.request_id if request.HasField("request_id") else uuid.uuid4().hex,
        prompt=request.prompt if request.prompt or not request.messages else None,
        raw_prompt=request.raw_prompt,
        messages=[ChatMessage(role=m.role, content=m.content) for m in request.messages]
        if request.messages
        else None,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else None,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        **{
            name: getattr(request, name)
            for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            if request.HasField(name)
        },
    )


def acceptance_stats(result: GenerationResult) -> dflash_pb2.AcceptanceStats:
    return dflash_pb2.AcceptanceStats(
        num_steps=result.num_steps,
        mean_acceptance_length=result.mean_acceptance_length,
        acceptance_lengths=result.acceptance_lengths,
    )


def to_response(result: GenerationResult) -> dflash_pb2.GenerateResponse:
    return dflash_pb2.GenerateResponse(
        request_id=result.request_id,
        text=result.text or "",
        token_ids=result.token_ids,
        finish_reason=result.finish_reason,
        prompt_tokens=result.num_prompt_tokens,
        completion_tokens=result.num_completion_tokens,
        acceptance=acceptance_stats(result),
    )


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an error from the request path to a gRPC status code and a message for the client.

    The engine returns its own errors as values. Anything else it raises arrives as a
    RayTaskError whose `cause` is the original exception. Only InvalidRequestError and a
    request that fails validation are INVALID_ARGUMENT. Any other ValueError is a server bug.
    """
    cause = error.cause if isinstance(error, RayTaskError) else error
    message = str(cause)
    if isinstance(error, BackPressureError):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the service is at capacity, retry later: {error.message}",
        )
    if isinstance(cause, (InvalidRequestError, pydantic.ValidationError)):
        return grpc.StatusCode.INVALID_ARGUMENT, message
    if isinstance(cause, EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE, message
    if isinstance(error, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, error.message
    if isinstance(error, RayActorError):
        return grpc.StatusCode.UNAVAILABLE, f"the engine replica died: {error}"
    if isinstance(cause, EngineStepError):
        return grpc.StatusCode.INTERNAL, message
    return grpc.StatusCode.INTERNAL, f"{type(cause).__name__}: {message}"


def set_error_status(
    context: RayServegRPCContext, request_id: str, error: BaseException
) -> RequestFailed:
    """Log the error and set its status on the context; returns the exception to end a stream."""
    code, message = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("request %s failed (%s): %s", request_id, code.name, message, exc_info=error)
    else:
        logger.warning("request %s failed (%s): %s", request_id, code.name, message)
    context.set_code(code)
    context.set_details(message)
    return RequestFailed(f"{code.name}: {message}")


@serve.deployment(name="DFlashIngress")
class DFlashIngress:
    """Serves `dflash.v1.DFlashService`; method names match the RPC names in the .proto."""

    def __init__(self, engine: DeploymentHandle, log_level: str = "INFO") -> None:
        configure_worker_logging(log_level)
        self.engine = engine

    async def Generate(  # noqa: N802 (the gRPC method name)
        self, request: dflash_pb2.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> dflash_pb2.GenerateResponse:
        request_id = request.request_id or "(unassigned)"
        try:
            generation = to_generation_request(request)
            request_id = generation.request_id
            final = await self.engine.generate.remote(generation)
            if final.error is not None:
                raise final.error
        except Exception as error:
            # The proxy sends the status set on the context with this empty response.
            set_error_status(grpc_context, request_id, error)
            return dflash_pb2.GenerateResponse()
        return to_response(final.result)

    async def GenerateStream(  # noqa: N802 (the gRPC method name)
        self, request: dflash_pb2.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[dflash_pb2.GenerateStreamResponse]:
        # NOTE: when a client cancels, ray.serve 2.60's gRPC proxy cancels this call only if it
        # is waiting for the next message, not while it is sending one. Otherwise the request
        # runs to completion on the engine, using its slot until then.
        request_id = request.request_id or "(unassigned)"
        try:
            generation = to_generation_request(request)
            request_id = generation.request_id
            chunks = self.engine.options(stream=True).generate_stream.remote(generation)
            async for chunk in chunks:
                if chunk.error is not None:
                    raise chunk.error
                response = dflash_pb2.GenerateStreamResponse(
                    request_id=request_id, text=chunk.text, token_ids=chunk.token_ids
                )
                if chunk.result is not None:
                    response.finish_reason = chunk.result.finish_reason
                    response.usage.prompt_tokens = chunk.result.num_prompt_tokens
                    response.usage.completion_tokens = chunk.result.num_completion_tokens
                    response.acceptance.CopyFrom(acceptance_stats(chunk.result))
                yield response
        except Exception as error:
            # Raised: a stream's context reaches the proxy with a message or an exception,
            # and an empty message would reach the client as output.
            raise set_error_status(grpc_context, request_id, error) from None
