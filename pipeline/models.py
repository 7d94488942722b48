"""Loading tokenizers (and, in later stages, models) from local folders, with content fingerprints."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .store import sha256_file

# Files that determine how text becomes token ids. Hashing the files (not the loaded object)
# keys caches on content, not on names, and is cheap: the hash is cached by path/size/mtime.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class ModelError(ValueError):
    """The model or tokenizer folder is unusable; the message says what to fix."""


def check_model_path(model: ModelConfig) -> Path:
    path = Path(model.path)
    if not path.is_dir():
        raise ModelError(
            f"model.path {path} is not a folder: point it at a local Hugging Face model folder "
            "(config.json, tokenizer files, safetensors weights)"
        )
    return path


def load_tokenizer(model: ModelConfig):
    """The fast tokenizer of ``model.path``. Remote code only runs when the config allows it."""
    from transformers import AutoTokenizer

    path = check_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), trust_remote_code=model.trust_remote_code
        )
    except Exception as exc:  # transformers raises many types here; all mean the same to a user
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"the tokenizer in {path} is not a fast (Rust) tokenizer: add a tokenizer.json "
            "(e.g. load it once with transformers and save_pretrained) so batch tokenization works"
        )
    return tokenizer


def tokenizer_files(model: ModelConfig) -> dict[str, str]:
    """sha256 of each tokenizer file in ``model.path`` (chat templates included): what decides
    how text becomes token ids."""
    path = check_model_path(model)
    return {name: sha256_file(path / name) for name in TOKENIZER_FILES if (path / name).is_file()}


WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")


def model_fingerprint(model: ModelConfig) -> dict:
    """Content of the model: config.json and every safetensors weight file, by sha256.

    Hashes are cached by path/size/mtime (see store.sha256_file), so a multi-GB model is
    hashed once, not on every run.
    """
    path = check_model_path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: it is not a Hugging Face model folder")
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    if not any(p.suffix == ".safetensors" for p in weights):
        raise ModelError(
            f"{path} has no .safetensors weights. Only safetensors are loaded (pickle-based .bin "
            "files can run code): convert with model.save_pretrained(dir, safe_serialization=True)"
        )
    return {
        "config_sha256": sha256_file(path / "config.json"),
        "weights": {p.name: sha256_file(p) for p in weights},
    }


def check_causal_lm(model: ModelConfig):
    """The model's config, after checking that transformers has a causal-LM class for it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = check_model_path(model)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {path}: {exc}") from exc
    remote = bool(getattr(config, "auto_map", {}).get("AutoModelForCausalLM"))
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (
        remote and model.trust_remote_code
    ):
        raise ModelError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language model "
            "(no AutoModelForCausalLM class): point model.path at a decoder-only LM"
        )
    return config


def load_causal_lm(model: ModelConfig, device: str = "cpu"):
    """The causal LM of ``model.path`` from safetensors, in ``model.dtype``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    check_causal_lm(model)
    path = check_model_path(model)
    lm = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=getattr(torch, model.dtype),  # float32 | bfloat16 | float16, checked by the config
        use_safetensors=True,
        trust_remote_code=model.trust_remote_code,
    )
    return lm.to(device).eval()
