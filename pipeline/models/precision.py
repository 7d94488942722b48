"""Training precision: what dtype the weights, gradients and optimizer states live in, and the
memory hygiene of a training step.

    precision = resolve(cfg)             # "float32" | "bf16-mixed" | "bf16"
    policy dtype: param_dtype(precision) # float32 master weights, except pure bf16
    with autocast(precision, device)():  # bf16 compute for bf16-mixed, nothing otherwise
    optimizer = make_optimizer(precision, params, lr=..., weight_decay=...)

Modes (bytes per parameter of the training state, measured in bench/memory_bench.py):
- ``float32``: float32 weights, gradients and AdamW moments: 16 B/param.
- ``bf16-mixed``: the same float32 state (master weights), forward/backward under bfloat16
  autocast: 16 B/param plus the bf16 weight copies autocast makes for each matmul.
- ``bf16`` (pure, as torchtune): weights, gradients and AdamW moments in bfloat16: 8 B/param.
  A bfloat16 weight has 8 significant bits, so an update smaller than ~1/256 of the weight
  rounds away to nothing: with DPO's usual learning rates (1e-6: updates ~1e-6 on weights
  ~1e-2) round-to-nearest AdamW leaves almost every weight unchanged. ``BF16AdamW`` computes
  the AdamW update in float32 and rounds the new weight stochastically (unbiased: the expected
  weight is the float32 one), which costs no memory, unlike Kahan summation (+2 B/param).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Callable

import torch

from pipeline.config.schema import Config

PRECISIONS = ("float32", "bf16-mixed", "bf16")


def resolve(cfg: Config) -> str:
    """train.precision, else derived from model.dtype as before the key existed."""
    if cfg.train.precision is not None:
        return cfg.train.precision
    return {"float32": "float32", "bfloat16": "bf16-mixed"}.get(cfg.model.dtype, "float32")


def param_dtype(precision: str) -> str:
    """dtype the policy is loaded in: float32 master weights except for pure bf16."""
    return "bfloat16" if precision == "bf16" else "float32"


def compute_dtype(precision: str) -> str:
    """dtype the forward pass runs in (what the step-0 tolerance depends on)."""
    return "float32" if precision == "float32" else "bfloat16"


def save_dtype(cfg: Config) -> str:
    """dtype of final/: train.save_dtype, else the dtype of the weights trained."""
    return cfg.train.save_dtype or param_dtype(resolve(cfg))


def autocast(precision: str, device: str) -> Callable:
    """A context-manager factory for the forward pass: bf16 autocast for bf16-mixed only."""
    if precision != "bf16-mixed":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)


def make_optimizer(precision: str, params, lr: float, weight_decay: float):
    """AdamW; for pure bf16 the stochastic-rounding variant, its moments in bf16 too. torch's fused
    AdamW where it takes the parameters (one kernel per step, and it can skip a step on the
    device: ``guarded_step``), else its default implementation."""
    if precision == "bf16":
        return BF16AdamW(params, lr=lr, weight_decay=weight_decay)
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a device or tensor type without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor (skips the update on the device)."""
    if isinstance(optimizer, BF16AdamW):
        return True
    return isinstance(optimizer, torch.optim.AdamW) and all(group.get("fused") for group in optimizer.param_groups)


def guarded_step(optimizer, failed: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``failed`` (0-dim float 0/1 on the device): decided on the device
    (GradScaler's found_inf) where the optimizer can, else read here (one host sync)."""
    if not skips_on_device(optimizer):
        if not failed.item():
            optimizer.step()
        return
    optimizer.found_inf = failed
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's defaults) for bfloat16 parameters: the moments are
    kept in the parameter's dtype, the update is computed in float32 one tensor at a time, and the
    new weight is rounded stochastically to bfloat16. Same state_dict layout as torch.optim.AdamW.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)  # guarded_step: keep every value where it is set
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]  # a 0-dim CPU tensor: the bias corrections below read no device value
                # Elementwise: on an FSDP2 shard (DTensor), the same update on the local part.
                param, moment1, moment2 = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                grad = _local(p.grad).float()
                exp_avg = moment1.float().lerp_(grad, 1 - beta1)
                exp_avg_sq = moment2.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                del grad
                step64 = step.double()
                denom = (exp_avg_sq / (1 - beta2**step64)).sqrt_().add_(group["eps"])
                weight = param.float().mul_(1 - group["lr"] * group["weight_decay"])
                weight.add_(exp_avg / denom * (-group["lr"] / (1 - beta1**step64)))
                del denom
                new = stochastic_round(weight), exp_avg, exp_avg_sq
                if found_inf is not None:
                    skip = found_inf.to(param.device) > 0
                    new = [torch.where(skip, old, value.to(old.dtype)) for old, value in zip((param, moment1, moment2), new)]
                param.copy_(new[0])
                moment1.copy_(new[1])
                moment2.copy_(new[2])
        return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank holds (an FSDP2 DTensor's local shard), or the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with probability equal to the distance to the lower
    bfloat16 neighbour, so that E[result] == x: random bits are added below the 16 bits bfloat16
    keeps, then cut off. inf and nan are rounded as usual."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    rounded = (bits + noise).bitwise_and_(-65536)  # 0xFFFF0000: keep the top 16 bits
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def state_bytes(model, optimizer) -> dict:
    """Bytes of the training state, by tensor kind: weights, gradients, optimizer states."""
    params = list(model.parameters())
    seen = {p.data_ptr() for p in params}
    out = {"weights": sum(p.numel() * p.element_size() for p in params),
           "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": 0, "parameters": sum(p.numel() for p in params), "distinct": len(seen)}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                out["optimizer"] += value.numel() * value.element_size()
    return out


# --- memory hygiene ---------------------------------------------------------------------------------

_LIBC = None


def release_memory(device: str) -> None:
    """After a training step on CPU: hand the freed heap back to the OS (glibc malloc_trim).

    glibc keeps freed memory in its arenas (activations of the last step: hundreds of MB, in
    many mid-sized blocks above the mmap threshold it raised itself), so RSS grows step after
    step; trimming keeps it flat between steps (measured in bench/memory_bench.py; the peak of a
    step, its activations, is not changed). No-op elsewhere.
    """
    global _LIBC
    if device != "cpu":
        return
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC = _LIBC if _LIBC and hasattr(_LIBC, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
