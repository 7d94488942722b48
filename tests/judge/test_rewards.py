"""pipeline.judge.rewards: a function judge's values, and a tiny local reward model read at each
row's last real token (the stage's refusals of bad functions are in test_stage.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.schema import JudgeConfig
from pipeline.errors import JudgeError
from pipeline.judge.rewards import RewardModel, function_rewards, load_function

# --- a function --------------------------------------------------------------------------------------


def test_function_values_are_floats(tmp_path, monkeypatch):
    name = "judge_rules_values"
    (tmp_path / f"{name}.py").write_text("import numpy as np\n\ndef f(prompt, completion):\n"
                                         "    return {'a': 1, 'b': np.float64(0.5), 'c': np.float32(2.0)}[completion]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function(f"{name}:f")
    values = function_rewards(fn, ["p", [{"role": "user", "content": "q"}], "p"], ["a", "b", "c"])
    assert values == [1.0, 0.5, 2.0] and all(type(v) is float for v in values)


def test_check_reward_names_the_completion():
    with pytest.raises(JudgeError, match="completion 1 returned nan"):
        function_rewards(lambda p, c: math.nan if c == "b" else 1, ["x", "y"], ["a", "b"])
    assert function_rewards(lambda p, c: np.int64(3), ["x"], ["a"]) == [3.0]


# --- a reward model ---------------------------------------------------------------------------------


def _save_classifier(tokenizer, folder: Path, num_labels: int = 1) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_model_dir(demo_tokenizer, tmp_path_factory) -> Path:
    return _save_classifier(demo_tokenizer, tmp_path_factory.mktemp("rm") / "model")


def _plain_forward(folder: Path, ids: list[int]) -> float:
    """The score of one row: a batch of one, no padding, read at its last token."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    model.config.pad_token_id = None  # batch of one: the last position
    with torch.inference_mode():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


PROMPTS = [[{"role": "user", "content": "Name a colour."}], "Say something kind:", "Hi", "Hi"]
COMPLETIONS = ["Blue.", "You are a wonderful and very kind friend to everyone.", "", "Hello there"]


def test_reward_model_matches_a_plain_forward(reward_model_dir, demo_tokenizer):
    rm = RewardModel(JudgeConfig(reward_model=str(reward_model_dir), batch_size=3, max_length=512, device="cpu"))
    values = rm(PROMPTS, COMPLETIONS)
    assert len(values) == 4 and all(type(v) is float for v in values) and rm.truncated == 0
    for prompt, completion, value in zip(PROMPTS, COMPLETIONS, values):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = demo_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)
        ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert value == pytest.approx(_plain_forward(reward_model_dir, ids), abs=1e-5)
    assert len(set(values)) == 4


def test_a_row_ending_in_the_pad_token_is_read_at_its_end(reward_model_dir, demo_tokenizer):
    rm = RewardModel(JudgeConfig(reward_model=str(reward_model_dir), batch_size=2, max_length=512, device="cpu"))
    rm.tokenizer.chat_template = None  # prompt text + completion, as-is
    completions = ["a short one<|endoftext|>", "a much longer completion than the other one"]
    values = rm(["Q: ", "Q: "], completions)
    for completion, value in zip(completions, values):
        ids = demo_tokenizer("Q: " + completion)["input_ids"]
        assert value == pytest.approx(_plain_forward(reward_model_dir, ids), abs=1e-5)
    assert demo_tokenizer("Q: " + completions[0])["input_ids"][-1] == demo_tokenizer.pad_token_id


def test_truncation_keeps_the_start(reward_model_dir, demo_tokenizer):
    def ids_of(prompt, completion):
        text = demo_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        return demo_tokenizer(text, add_special_tokens=False)["input_ids"]

    long = "kind words " * 30
    limit = len(ids_of("Hi", "ok")) + 2
    rm = RewardModel(JudgeConfig(reward_model=str(reward_model_dir), batch_size=4, max_length=limit, device="cpu"))
    values = rm(["Tell me", "Hi"], [long, "ok"])
    assert rm.truncated == 1 and len(ids_of("Tell me", long)) > limit
    assert values[0] == pytest.approx(_plain_forward(reward_model_dir, ids_of("Tell me", long)[:limit]), abs=1e-5)
    assert values[1] == pytest.approx(_plain_forward(reward_model_dir, ids_of("Hi", "ok")), abs=1e-5)


def test_models_without_one_score_are_refused(demo_tokenizer, demo_assets, tmp_path):
    two = _save_classifier(demo_tokenizer, tmp_path / "two", num_labels=2)
    with pytest.raises(JudgeError, match="has 2 labels; a reward model gives one score") as info:
        RewardModel(JudgeConfig(reward_model=str(two), device="cpu"))
    assert "\n" not in str(info.value)
    with pytest.raises(JudgeError, match="LlamaForCausalLM model, not a sequence-classification"):
        RewardModel(JudgeConfig(reward_model=str(demo_assets["model"]), device="cpu"))
