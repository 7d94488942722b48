"""Loading tokenizers (and, in later stages, models) from local folders, with content fingerprints."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .store import fingerprint, sha256_file

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


def tokenizer_fingerprint(model: ModelConfig, tokenizer) -> dict:
    """What identifies the tokenizer's behaviour: file hashes, chat template and special tokens."""
    path = check_model_path(model)
    files = {
        name: sha256_file(path / name) for name in TOKENIZER_FILES if (path / name).is_file()
    }
    template = getattr(tokenizer, "chat_template", None)
    return {
        "class": type(tokenizer).__name__,
        "files": files,
        "chat_template_sha256": fingerprint(template) if template else None,
        "special_tokens": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        },
        "vocab_size": len(tokenizer),
    }
