"""Several processes (``torchrun``): start the group, and make the processes agree.

Every helper here is the identity in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "is_distributed", "all_agree", "value_of_rank0", "broadcast_state", "rank0_first",
           "lost_peer", "world_size"]

# What gloo's error says when the other end of a collective is gone (its process killed, or stopped by an
# error of its own).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if "TORCHELASTIC_RUN_ID" in os.environ:
            _stop_with_launcher()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart > 0 and "MASTER_ADDR" in os.environ:
            # A group torchrun restarted: the plain env:// init finds the killed group's gloo addresses
            # in the agent's store and fails ("Connection refused"); a prefix per restart starts clean.
            rank = int(os.environ["RANK"])
            hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"    # the agent serves the store
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=not hosted and rank == 0)
            dist.init_process_group(backend, store=dist.PrefixStore(f"densedet/attempt_{restart}", store),
                                    rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _stop_with_launcher() -> None:
    """SIGTERM this worker when its torchrun dies (Linux's parent-death signal), as torchrun stops its
    workers when it ends itself: a torchrun killed with SIGKILL would leave them training on, unseen, in
    the run folder a ``--resume`` then shares with them."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)      # 1: PR_SET_PDEATHSIG


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes training together (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process of the group is gone."""
    return is_distributed() and isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE)


@contextlib.contextmanager
def rank0_first(wanted: bool = True) -> Iterator[None]:
    """Rank 0 runs the block before the other processes, which wait for it (a cache rank 0 writes, they
    read). When rank 0 fails inside, the others wait on until torchrun stops them: one error, rank 0's."""
    others_wait = wanted and is_distributed() and dist.get_rank() != 0
    if others_wait:
        dist.barrier()
    yield
    if wanted and is_distributed() and dist.get_rank() == 0:
        dist.barrier()


def all_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every process."""
    if not is_distributed():
        return flag
    failed = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(failed)
    return failed.item() == 0


def value_of_rank0(value: float, device: torch.device, dtype: torch.dtype = torch.int64) -> float:
    """Rank 0's ``value`` on every process (a decision taken once, for all)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=dtype, device=device)
    dist.broadcast(tensor, 0)
    return tensor.item()


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers of ``module``."""
    if not is_distributed():
        return
    for tensor in module.state_dict().values():
        packed = tensor.contiguous()        # channels_last weights: broadcast a packed copy
        dist.broadcast(packed, 0)
        tensor.copy_(packed)
