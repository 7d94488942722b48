"""Loading tokenizers and models from local folders or Hub ids, with content fingerprints.

``model.path`` is a local Hugging Face model folder, or a Hub id (``org/name``, with
``model.revision``) resolved by ``huggingface_hub.snapshot_download`` to a snapshot folder in the
local Hugging Face cache: HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and the usual token (HF_TOKEN or
`hf auth login`) apply as everywhere in the Hugging Face stack, and the token is never logged.
Only configs, tokenizer files and safetensors weights are fetched (never pickles). Everything
downstream sees the snapshot folder; the commit it holds is recorded (``model_source``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from pipeline.config.schema import ModelConfig, is_hub_id
from pipeline.errors import DpoError, ModelError
from pipeline.store import sha256_file

# Files that determine how text becomes token ids. Hashing the files (not the loaded object)
# keys caches on content, not on names, and is cheap: the hash is cached (see store.sha256_file).
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


log = logging.getLogger("dpo")

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
"""What is fetched of a Hub model: configs, tokenizer files, safetensors weights (no pickles)."""


def check_model_path(model: ModelConfig) -> Path:
    """The local folder of ``model.path``: the folder itself, or a Hub id's snapshot."""
    path = Path(model.path)
    if path.is_dir():
        if model.revision:
            raise ModelError(f"model.revision {model.revision!r} applies to a Hub id, but model.path {path} "
                             "is a local folder", hint="remove model.revision")
        return path
    if is_hub_id(model.path):
        return hub_snapshot(str(model.path), model.revision)
    raise ModelError(
        f"model.path {path} is neither a folder nor a Hub id (org/name)", hint="point it at a local Hugging Face "
        "model folder (config.json, tokenizer files, safetensors weights) or a model on the Hub"
    )


@functools.lru_cache(maxsize=None)
def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of a Hub model in the local Hugging Face cache (downloaded if needed
    and possible). Its name is the commit."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ModelError(f"{shown} is gated on the Hub: accept its terms on its page, then log in "
                         "(`hf auth login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no revision {revision!r}", hint="set model.revision to a branch, tag or "
                         "commit it has (or null for main)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model {repo_id} on the Hub (or it is private: log in with `hf auth login` or "
                         "set HF_TOKEN); for a local folder, check model.path") from None
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{shown} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, or no network)", hint="download it where "
            f"there is network with `hf download {repo_id}` into the same cache (HF_HOME), or point "
            "model.path at a local folder"
        ) from None
    log.debug("model %s: %s", shown, folder)
    return folder


def model_source(model: ModelConfig) -> dict:
    """Where the model came from, for manifests: the path as configured, and for a Hub id the
    revision asked for and the commit resolved."""
    if not is_hub_id(model.path):
        return {"path": str(model.path)}
    folder = check_model_path(model)
    return {"path": str(model.path), "hub_id": str(model.path), "revision": model.revision, "commit": folder.name}


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
            f"the tokenizer in {path} is not a fast (Rust) tokenizer", hint="add a tokenizer.json "
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

    Hashes are cached by path, size, mtime, inode and ctime (see store.sha256_file), so a
    multi-GB model is hashed once per content, not on every run: `dpo train` reuses the hashes
    `dpo score` made.
    """
    path = check_model_path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: it is not a Hugging Face model folder")
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    if not any(p.suffix == ".safetensors" for p in weights):
        raise ModelError(
            f"{path} has no .safetensors weights. Only safetensors are loaded (pickle-based .bin "
            "files can run code)", hint="convert with model.save_pretrained(dir, safe_serialization=True)"
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
            "(no AutoModelForCausalLM class)", hint="point model.path at a decoder-only LM"
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
        attn_implementation=attention_kernel(model.attn_implementation, device),
    )
    return lm.to(device).eval()


def attention_kernel(requested: str, device: str) -> str:
    """model.attn_implementation resolved: auto is sdpa on every device. Measured on an H200
    (bench/gpu_packing.py, docs/scaling.md): SDPA with pairs packed into rows as long as the
    longest pair scored 1.5-3.2x and trained 1.2-2x the tokens/s of padded rows; FlexAttention
    compiles once per new shape (tens of seconds on CPU) and falls back to its slow unfused path
    after torch._dynamo's recompile limit, which varying batch shapes reach."""
    return "sdpa" if requested == "auto" else requested


def pick_device(requested: str, key: str, error: type[DpoError]) -> str:
    """``requested`` (auto, cpu or cuda, the value of config key ``key``) as a device: auto is cuda
    when a CUDA GPU is visible, else cpu; cuda without one raises ``error``."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise error(f"{key}=cuda but no CUDA GPU is visible", hint=f"use {key}=auto")
    return requested
