"""The reward of a completion: a Python function, or a sequence-classification reward model.

    fn = load_function("mypkg.rules:reward")       # JudgeError (one line) when it cannot be used
    rewards = function_rewards(fn, prompts, completions, keys=[("p0", 0), ("p0", 1)])
    model = RewardModel(cfg.judge)                 # AutoModelForSequenceClassification, one label
    rewards = model(prompts, completions)          # list[float]; model.truncated: rows cut

``prompts`` are the prompts as read: a string, or a list of chat messages ({"role", "content"}).

A function ``module:function(prompt, completion) -> float`` is imported with the current folder
first on the Python path (as ``python -m`` does). Each value is checked as it comes: a bool, a
string, None or any other non-number, NaN and infinities are refused (JudgeError naming the
prompt_id and sample); ints and numpy numbers are taken as floats.

A reward model renders each (prompt, completion) with its tokenizer's chat template (a text prompt
as one user turn, the completion as the assistant's turn; without a template, the prompt text then
the completion), keeps the first ``judge.max_length`` tokens (counted in ``truncated``), and reads
its one logit, in float32, at each row's last real token: batches are padded on the right, and the
pad id handed to transformers' pooling (the rightmost token that is not the pad id) is one that no
row of the batch holds, so a row ending in the tokenizer's own pad or EOS token is read at its end.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config.schema import JudgeConfig, ModelConfig
from pipeline.errors import DpoError, JudgeError
from pipeline.models.loading import check_model_path, load_tokenizer, pick_device
from pipeline.storage.paths import importable_cwd

log = logging.getLogger("dpo.judge")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- a function ------------------------------------------------------------------------------------


def load_function(spec: str) -> Callable:
    """The function of ``module:function``, imported now, or JudgeError saying why not."""
    module_name, _, name = spec.partition(":")
    where = f"judge.function {spec}"
    importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise JudgeError(f"{where}: no module named {module_name}", hint="put it in the current folder "
                             "or on PYTHONPATH, or fix judge.function") from None
        raise JudgeError(f"{where}: importing {module_name} failed: {one_line(exc)}",
                         hint="install what it imports") from None
    except Exception as exc:  # the module's own code failed: its error, on one line
        raise JudgeError(f"{where}: importing {module_name} raised {type(exc).__name__}: {one_line(exc)}",
                         hint="fix the module") from None
    if not hasattr(module, name):
        raise JudgeError(f"{where}: module {module_name} ({getattr(module, '__file__', '?')}) has no {name}",
                         hint="fix the name after the colon") from None
    fn = getattr(module, name)
    if not callable(fn):
        raise JudgeError(f"{where}: {module_name}.{name} is a {type(fn).__name__}, not a function",
                         hint="point judge.function at a function (prompt, completion) -> float")
    return fn


def check_reward(value, what: str) -> float:
    """``value`` as a finite float, or JudgeError naming ``what`` returned it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise JudgeError(f"{what} returned {type(value).__name__} {one_line(repr(value), 60)}, not a number",
                         hint="return a finite float (a bool is refused too: return 1.0 or 0.0)")
    reward = float(value)
    if not math.isfinite(reward):
        raise JudgeError(f"{what} returned {reward}, not a finite number", hint="return a finite float")
    return reward


def _what(spec: str, keys: Sequence | None, i: int) -> str:
    if keys is None:
        return f"{spec} on completion {i}"
    prompt_id, sample = keys[i]
    return f"{spec} on prompt_id {prompt_id} sample {sample}"


def function_rewards(fn: Callable, prompts: list, completions: list[str], keys: Sequence | None = None,
                     bar=None) -> list[float]:
    """``fn(prompt, completion)`` of each pair, checked (check_reward). ``keys``: each one's
    (prompt_id, sample), for messages; ``bar``: a Progress to advance."""
    spec = f"judge.function {getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', '?')}"
    rewards = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        try:
            value = fn(prompt, completion)
        except Exception as exc:  # the user's code: its error, named, on one line
            raise JudgeError(f"{_what(spec, keys, i)} raised {type(exc).__name__}: {one_line(exc)}",
                             hint="fix the function (it is called as fn(prompt, completion))") from None
        rewards.append(check_reward(value, _what(spec, keys, i)))
        if bar is not None:
            bar.update(1)
    return rewards


# --- a reward model --------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    return pick_device(requested, "judge.device", JudgeError)


def _check_config(path: Path, shown: str):
    """The reward model's config, after checking it is a one-label sequence classifier."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise JudgeError(f"judge.reward_model {shown}: cannot read its config: {one_line(exc)}",
                         hint="point it at a Hugging Face model folder") from None
    archs = getattr(config, "architectures", None) or []
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or (
        archs and not any(a.endswith("ForSequenceClassification") for a in archs)
    ):
        raise JudgeError(f"judge.reward_model {shown} is a {archs[0] if archs else config.model_type} model, "
                         "not a sequence-classification reward model", hint="point it at an "
                         "AutoModelForSequenceClassification model with one label")
    if config.num_labels != 1:
        raise JudgeError(f"judge.reward_model {shown} has {config.num_labels} labels; a reward model gives one "
                         "score", hint="point it at a sequence-classification model with num_labels=1")
    return config


class RewardModel:
    """A sequence-classification reward model: ``model(prompts, completions) -> list[float]``."""

    def __init__(self, judge_cfg: JudgeConfig):
        import torch
        from transformers import AutoModelForSequenceClassification

        self.cfg = judge_cfg
        source = ModelConfig(path=judge_cfg.reward_model, revision=judge_cfg.revision, dtype=judge_cfg.dtype)
        shown = f"{judge_cfg.reward_model}@{judge_cfg.revision}" if judge_cfg.revision else judge_cfg.reward_model
        path = check_model_path(source)
        _check_config(path, shown)
        self.device = resolve_device(judge_cfg.device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=getattr(torch, judge_cfg.dtype), trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise JudgeError(f"judge.reward_model {shown}: cannot load it: {one_line(exc)}",
                             hint="it needs safetensors weights and a one-label classification head") from None
        self.model = model.to(self.device).eval()
        try:
            self.tokenizer = load_tokenizer(source)
        except DpoError as exc:
            raise JudgeError(f"judge.reward_model {shown}: {one_line(exc.message)}", hint=exc.hint) from None
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.truncated = 0

    def render(self, prompt, completion: str) -> str:
        """The text the model reads: the chat template's conversation, else prompt + completion."""
        tok = self.tokenizer
        if tok.chat_template:
            messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages.append({"role": "assistant", "content": completion})
            return tok.apply_chat_template(messages, tokenize=False)
        text = prompt if isinstance(prompt, str) else "\n\n".join(str(m.get("content", "")) for m in prompt)
        return text + completion

    def encode(self, prompts: list, completions: list[str]) -> list[list[int]]:
        """Each pair's token ids, cut to their first ``judge.max_length`` (counted in ``truncated``)."""
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        # a template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS)
        ids = self.tokenizer(texts, add_special_tokens=not self.tokenizer.chat_template)["input_ids"]
        limit = self.cfg.max_length
        self.truncated += sum(len(row) > limit for row in ids)
        return [list(row[:limit]) for row in ids]

    def __call__(self, prompts: list, completions: list[str], bar=None) -> list[float]:
        ids = self.encode(prompts, completions)
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # similar lengths together
        rewards = [0.0] * len(ids)
        size = self.cfg.batch_size
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            for i, value in zip(chunk, self._forward([ids[i] for i in chunk])):
                rewards[i] = value
            if bar is not None:
                bar.update(len(chunk))
        return rewards

    def _forward(self, rows: list[list[int]]) -> list[float]:
        """The score of each row: one right-padded batch, read at each row's last real token."""
        import torch

        pad = self._pad_for(rows)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        # transformers pools at the rightmost token that is not config.pad_token_id
        self.model.config.get_text_config().pad_token_id = pad
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [float(v) for v in logits[:, 0].float().cpu().tolist()]

    def _pad_for(self, rows: list[list[int]]) -> int:
        """The tokenizer's pad (else EOS) id, or, when a row holds it, the smallest id none holds."""
        used = {t for row in rows for t in row}
        if self.pad_id not in used:
            return self.pad_id
        vocab = self.model.config.get_text_config().vocab_size
        return next(t for t in range(vocab) if t not in used)
