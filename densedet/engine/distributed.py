"""Several processes (``torchrun``): start the group, and make the processes agree.

Every helper here is the identity in a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init_distributed", "is_distributed", "all_agree", "value_of_rank0", "broadcast_state"]


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
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


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
