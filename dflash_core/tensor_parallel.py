"""Tensor parallelism of the target over torch.distributed ranks.

Each rank keeps a `TargetShard` (`dflash_core.target_shard` lists what is split). Rank 0
runs the engine and calls a `TensorParallelTarget`, which has the interface of `TargetModel`.
It broadcasts each call to the follower ranks as a command, and they run `follow` until it
sends a shutdown. Acceptance is decided on rank 0 alone: truncating or resetting a slot changes
only rank 0's cache lengths, and every forward command carries the start of each row, so a
follower sets its own lengths from it before appending. Commands travel on a gloo group with
no practical timeout, because a follower may wait for hours between requests. Activations and
logits travel on the data group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dflash_core.checkpoint import load_target
from dflash_core.kv_cache import KVCache
from dflash_core.target import TargetModel, TargetOutput
from dflash_core.target_shard import TargetShard, plan_shards, shard_target, split_range

logger = logging.getLogger(__name__)

# Collectives on the data group wait this long for a peer's share of one layer.
DATA_TIMEOUT = timedelta(minutes=10)
# A follower waits this long for the next command, so an idle engine never times out.
COMMAND_TIMEOUT = timedelta(days=365)
HEADER_LEN = 4


class Command(IntEnum):
    FORWARD = 1  # header: cache index, batch, seq_len. Payload: ids, slots, row starts
    LOGITS = 2  # header: rows. Payload on the data group: hidden states [rows, hidden]
    NEW_CACHE = 3  # header: num_slots, max_seq_len
    SHUTDOWN = 4


# ---- the process group ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's membership of a tensor-parallel group."""

    rank: int
    world_size: int
    control: dist.ProcessGroup  # gloo, CPU tensors: command headers and integer payloads
    data: dist.ProcessGroup  # gloo on CPU, NCCL on GPU: all-reduces, hidden states, logits
    store: dist.Store  # kept alive: rank 0's store serves the rendezvous


def open_store(host: str, port: int, rank: int, world_size: int) -> dist.TCPStore:
    """Open the rendezvous store. Rank 0 serves it, and port 0 there picks a free port.

    Read the chosen port from the returned store's `port` and pass it to the other ranks.
    """
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0,
        wait_for_workers=False,
        timeout=DATA_TIMEOUT,
    )


def join_group(
    store: dist.Store, rank: int, world_size: int, device: torch.device
) -> TensorParallelGroup:
    """Join the group as `rank`, blocking until every rank has joined."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=DATA_TIMEOUT
    )
    control = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    logger.info(
        "rank %d of %d joined the tensor-parallel group (%s on %s)",
        rank,
        world_size,
        backend,
        device,
    )
    return TensorParallelGroup(rank, world_size, control, dist.group.WORLD, store)


def leave_group(group: TensorParallelGroup) -> None:
    """Destroy this process's process groups (a local call that waits for no other rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        logger.info("rank %d left the tensor-parallel group", group.rank)


# ---- rank 0 and the followers -----------------------------------------------------------


def _send_header(group: TensorParallelGroup, command: Command, *values: int) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    header[0] = command
    header[1 : 1 + len(values)] = torch.tensor(values, dtype=torch.long)
    dist.broadcast(header, src=0, group=group.control)


def _gather_logits(
    shard: TargetShard, group: TensorParallelGroup, hidden: torch.Tensor
) -> torch.Tensor | None:
    """Compute this rank's vocabulary slice of the logits for hidden [rows, hidden].

    Rank 0 gathers the slices and returns fp32 [rows, vocab]. The other ranks return None.
    """
    local = shard.logits(hidden)  # [rows, slice of vocab]
    # Gather needs equal sizes: pad each slice to the largest, then cut the padding off.
    slices = split_range(shard.config.vocab_size, group.world_size)
    widest = max(stop - start for start, stop in slices)
    padded = F.pad(local, (0, widest - local.shape[-1]))
    pieces = [torch.empty_like(padded) for _ in slices] if group.rank == 0 else None
    dist.gather(padded, pieces, dst=0, group=group.data)
    if pieces is None:
        return None
    return torch.cat([p[:, : stop - start] for p, (start, stop) in zip(pieces, slices)], dim=-1)


class TensorParallelTarget:
    """Rank 0's target over a tensor-parallel group, called like `TargetModel`.

    `forward` returns the final hidden states and the tapped layer outputs in full (they follow
    an all-reduce), and `logits` returns fp32 logits over the whole vocabulary. `embed_tokens`
    and `lm_head` are whole, for a drafter that borrows them.

    Calls are serialised by a lock, so followers see commands in one order. After a failure
    inside a command the ranks may be out of step, so every later call raises.
    """

    def __init__(self, shard: TargetShard, group: TensorParallelGroup, lm_head: nn.Linear) -> None:
        if group.rank != 0:
            raise ValueError(f"TensorParallelTarget runs on rank 0, not rank {group.rank}")
        self.shard = shard
        self.group = group
        self.config = shard.config
        self.embed_tokens = shard.embed_tokens
        # NOTE: an untied head is kept whole here for the drafter, which costs vocab x hidden
        # on rank 0. A tied head is the embedding table, which every rank keeps anyway.
        self.lm_head = lm_head
        self.caches: list[KVCache] = []
        self.failure: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    @property
    def device(self) -> torch.device:
        return self.shard.device

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        """Allocate a KV cache on every rank and return rank 0's, which stores its heads."""
        with self._command():
            _send_header(self.group, Command.NEW_CACHE, num_slots, max_seq_len)
            cache = self.shard.new_cache(num_slots, max_seq_len)
            self.caches.append(cache)
        return cache

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        tap_layer_ids: tuple[int, ...] = (),
    ) -> TargetOutput:
        """Run input_ids [batch, seq] on every rank, appended after each slot's cached tokens."""
        batch, seq_len = input_ids.shape
        index = next((i for i, c in enumerate(self.caches) if c is cache), None)
        if index is None:
            raise ValueError("the KV cache was not made by this target's new_cache")
        starts = cache.lengths[slots]  # [batch]
        # Checked before any rank starts, because KVCache.write would raise mid-command.
        last = int(starts.max()) + seq_len - 1
        if last >= cache.max_seq_len:
            raise ValueError(
                f"KV cache overflow: position {last} is past max_seq_len={cache.max_seq_len}"
            )
        with self._command():
            _send_header(self.group, Command.FORWARD, index, batch, seq_len)
            payload = torch.cat([input_ids.flatten().cpu(), slots.cpu(), starts.cpu()])
            dist.broadcast(payload, src=0, group=self.group.control)
            return self.shard(input_ids, cache, slots, tap_layer_ids)

    __call__ = forward

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return fp32 logits [..., vocab] for hidden [..., hidden], gathered from every rank."""
        rows = hidden.reshape(-1, hidden.shape[-1]).float().contiguous()  # [rows, hidden]
        with self._command():
            _send_header(self.group, Command.LOGITS, rows.shape[0])
            dist.broadcast(rows, src=0, group=self.group.data)
            logits = _gather_logits(self.shard, self.group, rows)
        return logits.view(*hidden.shape[:-1], self.config.vocab_size)

    def close(self) -> None:
        """Stop the followers' command loops (unless the group failed) and leave the group."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.failure is None:
                try:
                    _send_header(self.group, Command.SHUTDOWN)
                except RuntimeError as error:
                    logger.warning(
                        "could not send shutdown to the tensor-parallel ranks: %s", error
                    )
            leave_group(self.group)

    @contextmanager
    def _command(self) -> Iterator[None]:
        """Hold the lock for one command. A failure inside it marks the group unusable."""
        with self._lock:
            if self.closed or self.failure is not None:
                reason = "was closed" if self.closed else f"failed earlier: {self.failure}"
                raise RuntimeError(
                    f"the tensor-parallel target {reason}; restart the engine to serve again"
                )
            try:
                yield
            except BaseException as error:
                self.failure = error
                raise


def follow(shard: TargetShard, group: TensorParallelGroup) -> None:
    """Run rank 0's commands on this rank's shard until it sends a shutdown."""
    caches: list[KVCache] = []
    device = shard.device
    header = torch.empty(HEADER_LEN, dtype=torch.long)
    while True:
        dist.broadcast(header, src=0, group=group.control)
        command, *values = header.tolist()
        if command == Command.FORWARD:
            index, batch, seq_len = values[:3]
            payload = torch.empty(batch * seq_len + 2 * batch, dtype=torch.long)
            dist.broadcast(payload, src=0, group=group.control)
            payload = payload.to(device)
            input_ids = payload[: batch * seq_len].view(batch, seq_len)
            slots, starts = payload[batch * seq_len :].view(2, batch)
            caches[index].lengths[slots] = starts
            shard(input_ids, caches[index], slots)
        elif command == Command.LOGITS:
            rows = torch.empty(values[0], shard.config.hidden_size, device=device)
            dist.broadcast(rows, src=0, group=group.data)
            _gather_logits(shard, group, rows)
        elif command == Command.NEW_CACHE:
            caches.append(shard.new_cache(values[0], values[1]))
        elif command == Command.SHUTDOWN:
            logger.info("rank %d: shutdown received", group.rank)
            return
        else:
            raise RuntimeError(f"rank {group.rank}: unknown tensor-parallel command {command}")


# ---- starting a group -------------------------------------------------------------------


def rank0_target(
    model: TargetModel, group: TensorParallelGroup, device: torch.device | None = None
) -> TensorParallelTarget:
    """Shard a whole loaded target for rank 0 and wrap it. Drop `model` afterwards to free it.

    `device` (default: the model's) is where the shard and the whole LM head go, so a target
    loaded on the CPU never has to fit one GPU whole.
    """
    device = device or model.device
    shard = shard_target(model, plan_shards(model.config, group.world_size)[0], group.data)
    shard = shard.to(device)
    if model.config.tie_word_embeddings:
        # The head is the embedding table, which the shard already holds on `device`.
        config = model.config
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        lm_head.weight = shard.embed_tokens.weight
    else:
        lm_head = model.lm_head.to(device)  # moves the caller's head too; it drops the model
    return TensorParallelTarget(shard, group, lm_head)


def run_follower(
    folder: str, dtype: torch.dtype, rank: int, world_size: int, host: str, port: int
) -> None:
    """Load the target from `folder`, keep this rank's shard and follow rank 0 until shutdown.

    The entry point of a follower process started by `local_tensor_parallel`. It uses one
    torch thread.
    """
    torch.set_num_threads(1)
    model = load_target(folder, dtype=dtype)
    shard = plan_shards(model.config, world_size)[rank]
    group = join_group(open_store(host, port, rank, world_size), rank, world_size, model.device)
    try:
        sharded = shard_target(model, shard, group.data)
        del model
        follow(sharded, group)
    finally:
        leave_group(group)


@contextmanager
def local_tensor_parallel(
    model: TargetModel, folder: str, world_size: int, host: str = "127.0.0.1"
) -> Iterator[TensorParallelTarget]:
    """Run `model` over `world_size` ranks: this process is rank 0, the rest are new processes.

    `folder` contains the same model, which each follower process loads. The followers are
    stopped and joined on exit.
    """
    plan_shards(model.config, world_size)  # reject a bad world size before starting anything
    store = open_store(host, 0, 0, world_size)
    context = torch.multiprocessing.get_context("spawn")
    followers = [
        context.Process(
            target=run_follower,
            args=(str(folder), model.dtype, rank, world_size, host, store.port),
            name=f"dflash-tp-rank-{rank}",
            daemon=True,
        )
        for rank in range(1, world_size)
    ]
    for process in followers:
        process.start()
    target = None
    try:
        target = rank0_target(model, join_group(store, 0, world_size, model.device))
        yield target
    finally:
        if target is not None:
            target.close()
        elif dist.is_initialized():
            dist.destroy_process_group()
        for process in followers:
            process.join(timeout=30)
            if process.is_alive():
                logger.warning("tensor-parallel process %s did not stop, killing it", process.pid)
                process.kill()
            elif process.exitcode != 0:
                logger.warning(
                    "tensor-parallel process %s exited with code %s", process.pid, process.exitcode
                )
