"""One trainer on one process or many: rank and world size come from torchrun's environment.

    rlhf train                                          # one process (world size 1)
    torchrun --nproc_per_node 2 -m rlhf_loop.trainer.cli       # two ranks on this machine (= rlhf train --nproc 2)

Every rank runs the same round (trainer/round.py); `if dist.is_main` guards only what must
happen once: Kafka, the label store, the policy store, publishing. The round's inputs are
broadcast from rank 0; each rank trains on its share of every batch, DDP (default) or
FSDP2 (`train.strategy=fsdp2`, for models one device cannot hold) keeps the weights equal;
rollouts and the gate's evaluation are split across ranks and gathered. With world size 1
every collective below is the identity, so there is one code path.

Faults: the process group's timeout (train.collective_timeout_s) bounds every collective, so a
rank that dies or hangs fails the others' next collective instead of hanging them; torchrun
then stops the group (and restarts it with --max-restarts). Nothing is published before the
round's last step, and offsets are only ever committed after the label store (rank 0).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (gloo: cpu, nccl: this rank's GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 across several ranks: every forward is a collective, so ranks must run them in lockstep."""
        return self.world > 1 and self.strategy == "fsdp2"

    # ------------------------------------------------------------------ collectives (identity at world 1)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (picklable objects: the round's inputs, decisions)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_only(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0; its result, or the exception it raised, on every rank. The other ranks must
        not wait for rank 0 in a collective it never reaches: a Kafka error while rank 0 consumes or
        publishes is raised on every rank alike (and handled alike: the round is dropped)."""
        if self.world == 1:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as e:  # handed to every rank, re-raised below on each (rank 0 included)
                outcome = ("error", e)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (stop requests, 'all rows done')."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.item()

    # ------------------------------------------------------------------ sharding work

    def shard(self, n: int) -> tuple[list[int], int]:
        """This rank's share of 0..n-1 (a contiguous block; the first n % world ranks take one more),
        padded with repeats to ceil(n / world) so that every rank runs as many forwards (FSDP2's are
        collectives); returns (indices, how many are real: the results of the rest are dropped)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        mine = list(range(start, start + per + (self.rank < extra)))
        width = -(-n // self.world)
        return mine + [mine[-1] if mine else 0] * (width - len(mine)), len(mine)

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the optimizer steps through: DDP around `module` (its gradients are averaged over the
        ranks in backward), or `module` itself (one rank; FSDP2, already sharded by `shard_model`).

        init_sync is off: every rank loaded the same weights and makes the same updates, and the
        initial broadcast would copy a frozen base (LoRA) of any size every round.
        """
        if self.world == 1 or self.strategy == "fsdp2":
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, init_sync=False, device_ids=None if self.device.type == "cpu"
                                       else [self.device.index])

    def shard_model(self, model: torch.nn.Module) -> None:
        """FSDP2: shard `model` in place, one unit per transformer block (the model's `_no_split_modules`) and the root."""
        if not self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh)
        # the root reshards after forward too (FSDP2 keeps it gathered by default): between forwards,
        # named_parameters() must give the sharded parameters the optimizer and the snapshot hold
        fully_shard(model, mesh=mesh, reshard_after_forward=True)

    def close(self) -> None:
        """Leave together: a last collective first, so no rank tears the group down (or, as rank 0,
        the store it hosts) while a peer still uses it; a peer gone fails it within the timeout."""
        if self.world > 1 and torch_dist.is_initialized():
            self.any(False)
            torch_dist.destroy_process_group()


def _attempt_store(timeout: datetime.timedelta) -> torch_dist.Store:
    """The rendezvous store torchrun set up (MASTER_ADDR:MASTER_PORT), with this attempt's own key prefix.

    torchrun reuses its agent's store when it restarts the group, and the process group's keys
    are not per attempt there: a restarted rank could read a dead peer's address from the last
    attempt and fail to connect (seen here, about one restart in two). The restart count
    (TORCHELASTIC_RESTART_COUNT) in the prefix keeps every attempt's keys apart."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it (plain env://)
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                int(os.environ["WORLD_SIZE"]), is_master=not agent and os.environ["RANK"] == "0",
                                timeout=timeout)
    return torch_dist.PrefixStore(f"rlhf/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(strategy: Literal["ddp", "fsdp2"], timeout_s: float) -> Dist:
    """The process group torchrun set up in the environment (RANK, WORLD_SIZE, ...), or world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(strategy=strategy)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.init_process_group("nccl" if cuda else "gloo", store=_attempt_store(timeout), timeout=timeout,
                                  rank=int(os.environ["RANK"]), world_size=world)
    return Dist(rank=torch_dist.get_rank(), world=world, local_rank=local_rank, strategy=strategy,
                device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
