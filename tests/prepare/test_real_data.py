"""Real data (HH-RLHF harmless-base test split) and a real chat tokenizer (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from pipeline.prepare.stage import prepare

from tests.conftest import HH_TEST, requires_hh, write_jsonl

REPLACEMENT = "\ufffd"  # a cut through a multi-byte character decodes to this


def _smollm2(with_model: bool):
    from pipeline.errors import AssetError
    from pipeline.models.assets import smollm2_folder

    try:
        return smollm2_folder(with_model=with_model)
    except AssetError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_dir():
    return _smollm2(with_model=False)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_hh(result, tokenizer):
    originals = [json.loads(line) for line in gzip.open(HH_TEST, "rt", encoding="utf-8")]
    assert len(originals) == 2312
    counts = result.manifest["counts"]
    assert counts["rows_read"] == 2312
    assert counts["kept"] + counts["rejected"] == 2312
    examples = pq.read_table(result.output_dir / "examples.parquet").to_pylist()
    rejects = pq.read_table(result.output_dir / "rejects.parquet").to_pylist()
    assert sorted([e["source_row"] for e in examples] + [r["source_row"] for r in rejects]) == list(
        range(2312)
    )
    assert counts["kept"] > 2250  # only a handful of HH rows are unusable
    eos = tokenizer.eos_token_id
    exact = 0
    for ex in examples:
        original = originals[ex["source_row"]]
        assert ex["prompt"].endswith("Assistant:")
        assert original["chosen"] == ex["prompt"] + ex["chosen"]
        assert original["rejected"] == ex["prompt"] + ex["rejected"]
        prompt = decode(tokenizer, ex["prompt_ids"])
        assert prompt.endswith("Assistant:")  # keep_end truncation keeps the boundary
        for side in ("chosen", "rejected"):
            ids = ex[f"{side}_ids"]
            if not ex[f"{side}_truncated"]:
                assert ids[-1] == eos
                ids = ids[:-1]
            response = decode(tokenizer, ids)
            if ex[f"{side}_truncated"]:
                assert ex[side].startswith(response.rstrip(REPLACEMENT))
            else:
                assert response == ex[side]
        if ex["prompt_truncated"]:
            assert ex["prompt"].endswith(prompt.lstrip(REPLACEMENT))
        else:
            # Untruncated: prompt + response ids decode to the original text exactly.
            assert prompt == ex["prompt"]
            exact += not (ex["chosen_truncated"] or ex["rejected_truncated"])
    assert exact > 0.8 * len(examples)  # most rows are checked exactly, not modulo truncation
    for reject in rejects:
        assert reject["raw"] == json.dumps(originals[reject["source_row"]], ensure_ascii=False) or (
            json.loads(reject["raw"]) == originals[reject["source_row"]]
        )


@requires_hh()
def test_hh_harmless_implicit_demo_tokenizer(make_config, demo_tokenizer):
    cfg = make_config(HH_TEST, data={"format": "implicit"},
                      tokenize={"max_length": 1024, "max_prompt_length": 768})
    result = prepare(cfg, show_progress=False)
    assert result.manifest["format"] == "implicit"
    assert result.manifest["counts"]["prompt_truncated"] > 0  # the test covers truncation too
    check_hh(result, demo_tokenizer)


@pytest.mark.slow
@requires_hh()
def test_hh_harmless_implicit_smollm2(make_config, smollm2_dir):
    from transformers import AutoTokenizer

    cfg = make_config(HH_TEST, model_path=smollm2_dir)  # auto-detects the implicit format
    result = prepare(cfg, show_progress=False)
    assert result.manifest["format"] == "implicit"
    check_hh(result, AutoTokenizer.from_pretrained(str(smollm2_dir)))


@pytest.mark.slow
def test_conversational_smollm2_chat_template(tmp_path, make_config, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    rows = [
        {"prompt": [{"role": "user", "content": f"Name a colour, {i}."}],
         "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "I won't."}]}
        for i in range(6)
    ] + [
        {"prompt": [{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Again?"}],
         "chosen": [{"role": "assistant", "content": "Hello again."}],
         "rejected": [{"role": "assistant", "content": "No."}]}
    ]
    result = prepare(make_config(write_jsonl(tmp_path / "c.jsonl", rows), model_path=smollm2_dir),
                     show_progress=False)
    examples = pq.read_table(result.output_dir / "examples.parquet").to_pylist()
    assert len(examples) == len(rows)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    for ex, row in zip(examples, rows):
        full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        full_ids = tok(full, add_special_tokens=False).input_ids
        assert full_ids[: len(ex["prompt_ids"])] == ex["prompt_ids"]
        assert full_ids[len(ex["prompt_ids"]) :][: len(ex["chosen_ids"])] == ex["chosen_ids"]
        assert ex["chosen_ids"][-1] == im_end and ex["chosen_ids"].count(im_end) == 1
        assert decode(tok, ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert decode(tok, ex["chosen_ids"]) == row["chosen"][0]["content"] + "<|im_end|>"
    # SmolLM2's template adds its default system turn when the conversation has none.
    assert "You are a helpful AI assistant named SmolLM" in examples[0]["prompt"]
    assert "You are a helpful AI assistant named SmolLM" not in examples[-1]["prompt"]


@pytest.fixture(scope="session")
def smollm2_model_dir():
    return _smollm2(with_model=True)


@pytest.mark.slow
@requires_hh()
def test_score_smollm2_hh_rows_against_float64(tmp_path, make_config, smollm2_model_dir):
    """The real model on real rows: cached sums equal a float64 per-example forward pass."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.score.stage import score

    lines = gzip.open(HH_TEST, "rt", encoding="utf-8").readlines()[:4]
    data = tmp_path / "hh4.jsonl"
    data.write_text("".join(lines))
    cfg = make_config(data, model_path=smollm2_model_dir,
                      tokenize={"max_length": 96, "max_prompt_length": 64})
    prepared = prepare(cfg, show_progress=False)
    result = score(cfg, show_progress=False)
    examples = pq.read_table(prepared.output_dir / "examples.parquet").to_pylist()
    scores = pq.read_table(result.output_dir / "part-00000.parquet").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_model_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        for ex, sc in zip(examples, scores):
            for side in ("chosen", "rejected"):
                ids = ex["prompt_ids"] + ex[f"{side}_ids"]
                logps = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
                P = len(ex["prompt_ids"])
                ref = sum(float(logps[P + j - 1, t]) for j, t in enumerate(ex[f"{side}_ids"]))
                assert abs(sc[f"{side}_logp"] - ref) < 1e-3, (side, sc[f"{side}_logp"], ref)
                assert np.isfinite(sc[f"{side}_logp"]) and sc[f"{side}_logp"] < 0
