"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, state dicts.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we run as one plain process.
CPU runs use the gloo backend (that is what the tests use), GPUs nccl.

- DDP replicates the model and all-reduces gradients. MoE experts that received no token
  on a rank have no gradient there, hence find_unused_parameters=True for MoE models.
- FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state across processes,
  per transformer block, for models that do not fit one device. Checkpoints gather full
  state dicts on every rank (torch.distributed.checkpoint.state_dict) and rank 0 writes them.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "cpu") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def wrap(model: torch.nn.Module, info: DistInfo, kind: str) -> torch.nn.Module:
    """The module the loop calls: the model itself, a DDP wrapper, or the model fully sharded."""
    if not info.enabled:
        return model
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # buffers (the routers' balancing bias) are updated identically on every rank from the
    # all-reduced loads, so there is nothing to broadcast
    import warnings
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
               find_unused_parameters=model.config.is_moe, broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def is_sharded(model) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def model_state(model) -> dict:
    """A full (unsharded) CPU state dict, on every rank."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state(model, state: dict, strict: bool = True):
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(state, strict=strict)


def optim_state(model, opt) -> dict:
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optim_state(model, opt, state: dict):
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(unwrap(model), opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
