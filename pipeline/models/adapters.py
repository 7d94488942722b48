"""LoRA adapters with peft: wrap a loaded policy, save the final adapter (and a merged model).

    policy = with_lora(load_causal_lm(...), cfg.train.peft)   # only the adapters train
    save_final(policy, run_dir / "final", tokenizer, merge=cfg.train.merge_adapter)

peft is imported here only, and only when a run sets train.peft. The adapters start with B = 0,
so the wrapped policy computes exactly what the base model does: the step-0 check against the
base's cached log-probs holds. Checkpoints hold only the trained tensors (checkpoint.py saves
what requires grad); final/ holds the adapter in peft's format (adapter_config.json +
adapter_model.safetensors), loadable with ``PeftModel.from_pretrained(base, final)`` and with
``AutoPeftModelForCausalLM.from_pretrained(final)`` (adapter_config.json names the local base).
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a folder holds a peft adapter rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def with_lora(model, peft_cfg):
    """``model`` with LoRA adapters injected (a peft PeftModelForCausalLM); base weights frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.lora_alpha,
        lora_dropout=peft_cfg.lora_dropout,
        target_modules=peft_cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_final(policy, final: Path, tokenizer, merge: bool) -> None:
    """The adapter in peft's format (safetensors) + tokenizer into ``final``; with ``merge`` also
    final/merged/: the base with the adapters merged in, a full model folder (safetensors +
    tokenizer) usable as model.path. Merging changes ``policy``: call this last."""
    final = Path(final)
    policy.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    if merge:
        merged = policy.merge_and_unload()
        merged.save_pretrained(final / MERGED, safe_serialization=True)
        tokenizer.save_pretrained(final / MERGED)
