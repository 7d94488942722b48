"""Training on several processes with PyTorch's own engines: torchrun starts the processes,
DDP or FSDP2 (``fully_shard``) runs the model, torch.distributed.checkpoint's state-dict helpers
gather and restore the training state.

    world = start(expected=world_size(cfg.train), device="cuda")   # from torchrun's environment
    engine = wrap(policy, world, "fsdp", precision="bf16")         # ResponseLogps, sharded
    with accumulating(engine, sync=last_micro_batch): loss.backward()
    model_sd, optim_sd = full_state(engine, optimizer, world)      # on rank 0 (collective)

Starting the processes (torchrun as a child) and reporting which rank failed: pipeline/train/launch.py.

One process (world size 1) is the same code with ``World()``: no process group, no wrapper
other than ``ResponseLogps``. Gradients: DDP and FSDP2 both *average* gradients over the
processes, so a rank scales its loss by world size / effective batch (trainer.py): the averaged
gradient is then exactly the gradient of the mean loss over the whole global batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import DistributedError
from pipeline.logprobs.response import ResponseLogps


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over all processes of each value (0-dim tensors, float64, in one all-reduce; they
        stay on their device: no host sync)."""
        if self.size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        device = values[keys[0]].device
        tensor = torch.stack([values[k].to(device, torch.float64) for k in keys]).to(_comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return dict(zip(keys, tensor.to(device).unbind()))

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def start(expected: int, device: str) -> World:
    """Join the process group torchrun set up (its RANK / WORLD_SIZE / LOCAL_RANK environment),
    checking that the world has the size the config says; World() for one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size != expected:
        if size == 1:
            raise DistributedError(
                f"the config asks for {expected} training processes (train.nproc_per_node x train.nnodes) "
                "but this is one process", hint="run `dpo train -c CONFIG` (it starts torchrun itself), or on each "
                "node `torchrun --nnodes ... --nproc-per-node ... -m flows.cli train -c CONFIG`"
            )
        raise DistributedError(
            f"torchrun started {size} processes but the config asks for {expected} (train.nproc_per_node "
            "x train.nnodes, which set the effective batch and the run's identity)", hint="set them to match, e.g. "
            f"--set train.nproc_per_node={size}"
        )
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(world.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
        else:
            dist.init_process_group("gloo")
    return world


def stop(world: World, finished: bool = True) -> None:
    """Leave the process group. After a finished run all ranks meet at a barrier first (a rank
    tearing its connections down while a peer's gloo threads still use them can abort that
    peer); after a failure no barrier (the others may be waiting in another collective, and
    torchrun stops them)."""
    if world.size > 1 and dist.is_initialized():
        try:
            if finished:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def device_of(world: World, device: str) -> str:
    """The device this rank trains on: its own GPU (cuda:LOCAL_RANK), or the CPU."""
    return f"cuda:{world.local_rank}" if device == "cuda" else device


# --- the model under DDP or FSDP2 ----------------------------------------------------------------


def decoder_layers(policy) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (its ``_no_split_modules`` classes, as
    accelerate and TRL find them), under a peft wrapper too."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in policy.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules): FSDP2 cannot shard it "
            "per layer; use train.distributed=ddp"
        )
    return layers


def wrap(policy, world: World, mode: str, precision: str) -> torch.nn.Module:
    """The policy's forward (``ResponseLogps``) as the engine runs it: as is for one process,
    under DDP, or sharded with FSDP2 (each decoder layer, then the root; bf16-mixed as a
    MixedPrecisionPolicy: bf16 weights in the forward, float32 master weights and gradient
    reduction). Build the optimizer after this: under FSDP2 it must see the sharded parameters."""
    module = ResponseLogps(policy)
    if world.size == 1:
        return module
    if mode == "ddp":
        cuda = next(policy.parameters()).device.type == "cuda"
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[world.local_rank] if cuda else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
                                 reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        fully_shard(layer, mp_policy=mixed)
    fully_shard(module, mp_policy=mixed)
    return module


def uses_autocast(world: World, mode: str) -> bool:
    """bf16-mixed is autocast, except under FSDP2, whose MixedPrecisionPolicy does it."""
    return world.size == 1 or mode == "ddp"


def inner(engine) -> ResponseLogps:
    return engine.module if isinstance(engine, torch.nn.parallel.DistributedDataParallel) else engine


@contextlib.contextmanager
def accumulating(engine, sync: bool):
    """Backward passes inside accumulate gradients; reduce them over the ranks only when
    ``sync`` (the last micro-batch of an optimizer step)."""
    if isinstance(engine, torch.nn.parallel.DistributedDataParallel) and not sync:
        with engine.no_sync():
            yield
        return
    if hasattr(engine, "set_requires_gradient_sync"):  # an FSDP2 module
        engine.set_requires_gradient_sync(sync)
    yield


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards under FSDP2); returns it before clipping,
    a 0-dim tensor on the gradients' device (read it with the step's other metrics: one sync)."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm over every shard
        total = total.full_tensor()
    return total


# --- the training state as full (unsharded) state dicts ------------------------------------------

_PREFIX = "model."  # ResponseLogps holds the policy as .model


def _options(world: World, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=world.size > 1, **kwargs)


def full_state(engine, optimizer, world: World) -> tuple[dict, dict]:
    """(weights by the policy's parameter names, optimizer state by parameter names): whole
    tensors, the same for any world size and engine, so a run resumes on another number of
    GPUs. A collective: every rank calls it; under DDP/FSDP2 only rank 0 gets the tensors (on the CPU)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = inner(engine)
    weights = get_model_state_dict(module, options=_options(world))
    optim = get_optimizer_state_dict(module, optimizer, options=_options(world))
    return {k.removeprefix(_PREFIX): v for k, v in weights.items()}, optim


def load_full_state(engine, optimizer, world: World, weights: dict, optim: dict | None) -> None:
    """Put full state dicts (from ``full_state``, read from disk by every rank) into the
    engine's model (sharding them under FSDP2) and optimizer. ``weights`` may hold only the
    trained parameters (LoRA): the others keep their loaded values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    module = inner(engine)
    options = StateDictOptions(full_state_dict=True, strict=False)
    expected = set(get_trained_names(module))
    if not expected <= set(weights):
        raise ValueError(f"the checkpoint lacks {len(expected - set(weights))} trained tensors")
    set_model_state_dict(module, {_PREFIX + k: v for k, v in weights.items()}, options=options)
    if optim is not None:
        # set_optimizer_state_dict turns tuples in the param groups (AdamW's betas) into lists:
        # the same numbers, but the next checkpoint's optimizer.pt would not have the bytes of an
        # uninterrupted run's. The optimizer's own types are put back.
        kinds = [{key: type(value) for key, value in group.items()} for group in optimizer.param_groups]
        set_optimizer_state_dict(module, optimizer, optim, options=StateDictOptions(full_state_dict=True))
        for group, kind in zip(optimizer.param_groups, kinds):
            for key, value in group.items():
                if kind.get(key) is tuple and isinstance(value, list):
                    group[key] = tuple(value)


def get_trained_names(module) -> list[str]:
    return [name.removeprefix(_PREFIX) for name, p in module.named_parameters() if p.requires_grad]
