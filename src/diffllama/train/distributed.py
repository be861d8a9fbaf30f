"""Process-group set-up and the one function that turns a single-device model into a parallel one.

The model code knows nothing of distribution. :func:`parallelize` applies, in order: activation checkpointing
(the model's own per-layer flag), ``torch.compile`` per decoder layer, then either DDP or FSDP2
(``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the root). Launch several processes with
``torchrun --nproc_per_node=N -m diffllama train ...``; torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are read
here. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its host, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and prints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group of more than one process is in use."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process' device.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun on CUDA each process
    takes GPU ``LOCAL_RANK``.

    Raises:
        ValueError: "cuda" asked for but no GPU is available, or fewer GPUs than local processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available (use --device cpu)")
        if device == "cuda":
            if world > 1 and local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
            device = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(device))
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def parallel_mode(requested: str, info: DistInfo) -> str:
    """Resolve ``parallel`` ("auto", "none", "ddp", "fsdp") for this launch: "auto" is DDP with several processes.

    "ddp"/"fsdp" need a torchrun launch (they join its process group); under torchrun with one process "ddp" is
    no wrap and "fsdp" a no-op wrap.

    Raises:
        ValueError: "ddp"/"fsdp" without torchrun; "none" with several processes (the ranks would drift apart).
    """
    if requested in ("ddp", "fsdp") and "RANK" not in os.environ:  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...
        raise ValueError(f"--parallel {requested} needs processes launched by torchrun (e.g. torchrun "
                         f"--nproc_per_node=N -m diffllama train ... --parallel {requested}); for one process "
                         f"use --parallel none or auto")
    if requested == "auto":
        return "ddp" if info.distributed else "none"
    if requested == "none" and info.distributed:
        raise ValueError("parallel='none' with several processes would train unsynchronised copies; "
                         "use 'ddp' or 'fsdp'")
    if requested == "ddp" and not info.distributed:
        return "none"
    return requested


def parallelize(module: nn.Module, layers: nn.ModuleList, *, mode: str, info: DistInfo,
                activation_checkpointing: bool = False, compile: bool = False,
                mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to ``module``; return the module to call.

    Args:
        module: the training module (model + loss); its forward returns the loss.
        layers: the decoder layers inside it (``fully_shard`` and ``torch.compile`` units).
        mode: "none", "ddp" or "fsdp" (see :func:`parallel_mode`).
        activation_checkpointing: recompute each decoder layer in backward (sets the model's flag).
        compile: ``torch.compile`` each decoder layer in place.
        mixed_precision: for FSDP2, the parameter dtype for compute (e.g. bfloat16); reductions stay float32.
            Not used by DDP (autocast handles it).

    Returns:
        ``module`` itself (FSDP2 and compile act in place; "none"), or its ``DistributedDataParallel`` wrapper.
    """
    model = getattr(module, "model", module)
    if activation_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    if compile:
        for layer in layers:
            layer.compile()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fully_shard's default mesh takes the CUDA device of each local rank whenever CUDA exists, even for a CPU
        # (gloo) run, so the mesh is built for the device this process actually trains on.
        kwargs = {"mesh": init_device_mesh(info.device.type, (info.world_size,))}
        if mixed_precision is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        return module
    return module


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``value`` over all ranks (in place; returned). A no-op with one process."""
    if info.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op with one process)."""
    if info.distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
