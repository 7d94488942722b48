"""read_prompts: every row kept or rejected with its reason, prompts rendered as prepare renders
them, sorted by prompt id, skipped when done; an absent column fails before anything is written."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.errors import GenerateError
from pipeline.generate.stage import prompts_table, read_prompts
from pipeline.storage import paths
from pipeline.store import canonical_json, fingerprint

CHAT = [{"role": "user", "content": "Tell me about the black cat."}]
LINES = [
    json.dumps({"prompt": "Hello there"}),                         # 0 kept (text)
    "{not json",                                                   # 1 malformed_json
    "[1, 2]",                                                      # 2 not_an_object
    json.dumps({"other": "x"}),                                    # 3 missing_field
    json.dumps({"prompt": "   "}),                                 # 4 empty_field
    json.dumps({"prompt": 42}),                                    # 5 wrong_type
    json.dumps({"prompt": "Hello there"}),                         # 6 duplicate of 0
    json.dumps({"prompt": "the cat is calm " * 40}),               # 7 too_long
    json.dumps({"prompt": CHAT}),                                  # 8 kept (chat)
    json.dumps({"prompt": []}),                                    # 9 empty_field
    json.dumps({"prompt": [{"role": "user"}]}),                    # 10 wrong_type
    json.dumps({"prompt": None}),                                  # 11 missing_field
    json.dumps({"prompt": "Another prompt", "extra": 1}),          # 12 kept (text)
    json.dumps({"prompt": CHAT}),                                  # 13 duplicate of 8
]
EXPECTED_REJECTS = {1: "malformed_json", 2: "not_an_object", 3: "missing_field", 4: "empty_field", 5: "wrong_type",
                    6: "duplicate", 7: "too_long", 9: "empty_field", 10: "wrong_type", 11: "missing_field",
                    13: "duplicate"}


@pytest.fixture
def prompts_cfg(tmp_path, demo_assets, make_config):
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    return make_config(demo_assets["data"], tokenize={"max_length": 128, "max_prompt_length": 32},
                       generate={"prompts": str(source)})


def test_every_row_is_kept_or_rejected_with_its_reason(prompts_cfg, demo_tokenizer):
    result = read_prompts(prompts_cfg, show_progress=False)
    assert not result.skipped
    table = prompts_table(result.output_dir)
    rejects = pq.read_table(result.output_dir / paths.REJECTS).to_pylist()
    assert {r["source_row"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["raw"] == LINES[r["source_row"]] for r in rejects)
    kept_rows = table.column("source_row").to_pylist()
    assert sorted(kept_rows) == [0, 8, 12]
    assert set(kept_rows) | set(EXPECTED_REJECTS) == set(range(len(LINES)))
    counts = result.manifest["counts"]
    assert counts["rows_read"] == len(LINES) and counts["kept"] == 3 == result.manifest["count"]
    assert counts["rejected"] == len(EXPECTED_REJECTS)
    assert counts["rejected_by_reason"] == {"duplicate": 2, "empty_field": 2, "malformed_json": 1, "missing_field": 2,
                                            "not_an_object": 1, "too_long": 1, "wrong_type": 2}
    ids = table.column("prompt_id").to_pylist()
    assert ids == sorted(ids)  # the deterministic shuffle: positions in prompt-id order


def test_prompts_are_rendered_as_prepare_renders_them(prompts_cfg, demo_tokenizer):
    table = prompts_table(read_prompts(prompts_cfg, show_progress=False).output_dir)
    rows = {r["source_row"]: r for r in table.to_pylist()}
    text, chat = rows[0], rows[8]
    assert text["prompt"] == canonical_json("Hello there") and text["prompt_id"] == fingerprint("Hello there")[:16]
    assert text["prompt_ids"] == demo_tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    rendered = demo_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert chat["prompt_ids"] == demo_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert json.loads(chat["prompt"]) == CHAT and chat["prompt_id"] == fingerprint(CHAT)[:16]


def test_a_rerun_is_skipped(prompts_cfg):
    first = read_prompts(prompts_cfg, show_progress=False)
    again = read_prompts(prompts_cfg, show_progress=False)
    assert again.skipped and again.output_dir == first.output_dir and again.manifest == first.manifest


def test_data_path_gives_the_prompts_when_generate_prompts_is_unset(demo_assets, make_config):
    cfg = make_config(demo_assets["data"], tokenize={"max_length": 128, "max_prompt_length": 64})
    result = read_prompts(cfg, show_progress=False)
    counts = result.manifest["counts"]
    assert counts["kept"] > 100 and counts["kept"] + counts["rejected"] == counts["rows_read"]
    assert result.manifest["chat_prompts"] == counts["kept"]  # the demo's prompts are conversations


def test_an_absent_column_fails_before_anything_is_written(tmp_path, make_config):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": "c"}) + "\n")
    cfg = make_config(source)
    with pytest.raises(GenerateError) as info:
        read_prompts(cfg, show_progress=False)
    message = info.value.message
    assert "no column 'prompt' in" in message and "(its first row has: chosen, rejected)" in message
    assert "generate.prompt_column" in info.value.hint and "\n" not in str(info.value)
    assert not (tmp_path / "storage").exists()


def test_text_prompts_as_user_turns_are_chat_prompts_in_their_own_folder(prompts_cfg, demo_tokenizer):
    """generate.text_prompts user_turn: "Hello there" is read as one user message, rendered with the
    chat template (what an instruct model was trained on), and kept in that form for the pairs."""
    plain = read_prompts(prompts_cfg, show_progress=False)
    prompts_cfg.generate.text_prompts = "user_turn"
    turns = read_prompts(prompts_cfg, show_progress=False)
    assert turns.output_dir != plain.output_dir  # another identity: other token ids
    rows = {r["source_row"]: r for r in prompts_table(turns.output_dir).to_pylist()}
    message = [{"role": "user", "content": "Hello there"}]
    assert json.loads(rows[0]["prompt"]) == message and rows[0]["prompt_id"] == fingerprint(message)[:16]
    rendered = demo_tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    assert rows[0]["prompt_ids"] == demo_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert turns.manifest["chat_prompts"] == turns.manifest["count"] == 3
