"""The prepare stage: formats, token boundaries, truncation, rejects, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PrepareError
from pipeline.prepare.stage import prepare

from tests.conftest import standard_rows, write_jsonl


def read_examples(result):
    return pq.read_table(result.output_dir / "examples.parquet").to_pylist()


def read_rejects(result):
    return pq.read_table(result.output_dir / "rejects.parquet").to_pylist()


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_standard_format_ids_and_boundary(tmp_path, make_config, demo_tokenizer):
    rows = standard_rows()
    cfg = make_config(write_jsonl(tmp_path / "d.jsonl", rows))
    result = prepare(cfg, show_progress=False)
    assert result.manifest["format"] == "standard"
    examples = read_examples(result)
    assert len(examples) == len(rows)
    eos = demo_tokenizer.eos_token_id
    for ex, row in zip(examples, rows):
        assert ex["prompt_ids"] == demo_tokenizer(row["prompt"]).input_ids
        # Responses are tokenized on their own and end with EOS: the prompt ends where they begin.
        assert ex["chosen_ids"][-1] == eos and ex["rejected_ids"][-1] == eos
        assert decode(demo_tokenizer, ex["prompt_ids"]) == row["prompt"]
        assert decode(demo_tokenizer, ex["chosen_ids"][:-1]) == row["chosen"]
        assert decode(demo_tokenizer, ex["rejected_ids"][:-1]) == row["rejected"]
        assert ex["chosen_tokens"] == len(ex["chosen_ids"])
        # The id: the first 16 hex digits of the sha256 of the row's canonical JSON, computed here
        # independently; the split: that id as a fraction of 16^16, below eval_fraction -> eval.
        canonical = json.dumps({"chosen": row["chosen"], "prompt": row["prompt"], "rejected": row["rejected"]},
                               sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert ex["id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
        assert ex["split"] == ("eval" if int(ex["id"], 16) < cfg.data.eval_fraction * 16**16 else "train")


def test_add_eos_off(tmp_path, make_config, demo_tokenizer):
    cfg = make_config(write_jsonl(tmp_path / "d.jsonl", standard_rows(3)), tokenize={"add_eos": False})
    for ex in read_examples(prepare(cfg, show_progress=False)):
        assert demo_tokenizer.eos_token_id not in ex["chosen_ids"]
        assert decode(demo_tokenizer, ex["chosen_ids"]).startswith(" It is")


def test_every_row_is_kept_or_rejected_with_its_reason(tmp_path, make_config):
    good = standard_rows(10)
    lines = [
        good[0],
        "{not json",                                            # 1 malformed_json
        "[1, 2, 3]",                                            # 2 not_an_object
        {"prompt": "p", "chosen": "a"},                         # 3 missing_field
        {"prompt": "p", "chosen": "  ", "rejected": "b"},       # 4 empty_field
        {"prompt": "p", "chosen": 5, "rejected": "b"},          # 5 wrong_type
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # 6 chosen_equals_rejected
        good[0],                                                # 7 duplicate
        "",                                                     # 8 blank line: not a row
        {"prompt": None, "chosen": "a", "rejected": "b"},       # 9 missing_field (null)
        *good[1:],
    ]
    cfg = make_config(write_jsonl(tmp_path / "d.jsonl", lines))
    result = prepare(cfg, show_progress=False)
    counts = result.manifest["counts"]
    rejects = {r["source_row"]: r for r in read_rejects(result)}
    expected = {
        1: "malformed_json", 2: "not_an_object", 3: "missing_field", 4: "empty_field",
        5: "wrong_type", 6: "chosen_equals_rejected", 7: "duplicate", 9: "missing_field",
    }
    assert {row: r["reason"] for row, r in rejects.items()} == expected
    assert rejects[1]["raw"] == "{not json"
    assert json.loads(rejects[5]["raw"])["chosen"] == 5
    assert rejects[7]["detail"] == "same as source row 0"
    assert counts["rows_read"] == 18 and counts["kept"] == 10 and counts["rejected"] == 8
    assert counts["rejected_by_reason"]["missing_field"] == 2
    kept_rows = sorted(ex["source_row"] for ex in read_examples(result))
    assert kept_rows == [0] + list(range(10, 19))


def test_reject_fraction_bound_fails_and_keeps_rejects(tmp_path, make_config):
    lines = ["{bad"] * 6 + standard_rows(4)
    cfg = make_config(write_jsonl(tmp_path / "d.jsonl", lines), data={"max_reject_fraction": 0.5})
    with pytest.raises(PrepareError, match=r"6 of 10 rows rejected.*max_reject_fraction") as err:
        prepare(cfg, show_progress=False)
    rejects_file = str(err.value).split("are in ")[1].split(". ")[0]
    assert pq.read_table(rejects_file).num_rows == 6
    cfg = make_config(write_jsonl(tmp_path / "d.jsonl", lines), data={"max_reject_fraction": 0.6})
    assert prepare(cfg, show_progress=False).manifest["counts"]["kept"] == 4


def test_parquet_gzip_and_datasets_folder_inputs(tmp_path, make_config):
    rows = standard_rows(12)
    # Custom column names, to exercise data.*_column.
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    columns = {"prompt_column": "q", "chosen_column": "good", "rejected_column": "bad"}
    table = pa.Table.from_pylist(renamed)
    pq.write_table(table, tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl.gz", renamed, gz=True)
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    results = [
        prepare(make_config(path, data=columns), show_progress=False)
        for path in (tmp_path / "d.parquet", tmp_path / "d.jsonl.gz", folder)
    ]
    ids = [[ex["chosen_ids"] for ex in read_examples(r)] for r in results]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 12


def test_conversational_with_chat_template(tmp_path, make_config, demo_tokenizer):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Describe the red fox number {i}."}],
            "chosen": [{"role": "assistant", "content": "The red fox is calm."}],
            "rejected": f"The red fox is rude {i}.",  # a plain string is one assistant message
        }
        for i in range(8)
    ]
    result = prepare(make_config(write_jsonl(tmp_path / "c.jsonl", rows)), show_progress=False)
    assert result.manifest["format"] == "conversational"
    assert result.manifest["chat_template_applied"] is True
    im_end = demo_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ex, row in zip(read_examples(result), rows):
        full = demo_tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        full_ids = demo_tokenizer(full, add_special_tokens=False).input_ids
        # The prompt ids are a prefix of the whole rendered conversation's ids.
        assert full_ids[: len(ex["prompt_ids"])] == ex["prompt_ids"]
        assert decode(demo_tokenizer, ex["prompt_ids"]).endswith("<|im_start|>assistant\n")
        # The template's end-of-turn ends the response; no second EOS, no trailing newline.
        assert ex["chosen_ids"][-1] == im_end and ex["chosen_ids"].count(im_end) == 1
        assert decode(demo_tokenizer, ex["chosen_ids"]) == "The red fox is calm.<|im_end|>"
        assert full.startswith(ex["prompt"] + ex["chosen"])


def test_chat_template_that_is_not_a_prefix_is_rejected(tmp_path, make_config, demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_assets["model"]))
    # A template that renders a system turn only when an answer follows: the rendered prompt is
    # then not a prefix of the rendered conversation.
    tok.chat_template = (
        "{% if not add_generation_prompt %}<|im_start|>system\nhi<|im_end|>\n{% endif %}"
        + tok.chat_template
    )
    model_dir = tmp_path / "odd-template"
    tok.save_pretrained(model_dir)
    rows = [
        {"prompt": [{"role": "user", "content": f"q{i}"}],
         "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]}
        for i in range(3)
    ]
    cfg = make_config(write_jsonl(tmp_path / "c.jsonl", rows), model_path=model_dir,
                      data={"max_reject_fraction": 1.0})
    result = prepare(cfg, show_progress=False)
    assert {r["reason"] for r in read_rejects(result)} == {"chat_template_prefix_mismatch"}
    assert result.manifest["counts"]["kept"] == 0


def test_implicit_text_and_conversations(tmp_path, make_config):
    text_rows = [
        {"chosen": f"\n\nHuman: hi {i}\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: Fine {i}.",
         "rejected": f"\n\nHuman: hi {i}\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: Go away."}
        for i in range(5)
    ] + [{"chosen": "no marker a", "rejected": "no marker b"}]
    result = prepare(make_config(write_jsonl(tmp_path / "t.jsonl", text_rows)), show_progress=False)
    assert result.manifest["format"] == "implicit"
    examples = read_examples(result)
    assert [ex["chosen"] for ex in examples] == [f" Fine {i}." for i in range(5)]
    assert all(ex["prompt"].endswith("\n\nHuman: and?\n\nAssistant:") for ex in examples)
    assert [r["reason"] for r in read_rejects(result)] == ["no_shared_prompt"]

    def conv(i, answer, first="hi"):
        return [{"role": "user", "content": f"{first} {i}"},
                {"role": "assistant", "content": answer}]

    chat_rows = [{"chosen": conv(i, "kind"), "rejected": conv(i, "rude")} for i in range(4)]
    chat_rows.append({"chosen": conv(9, "kind"), "rejected": conv(9, "rude", first="yo")})
    result = prepare(make_config(write_jsonl(tmp_path / "c.jsonl", chat_rows)), show_progress=False)
    assert result.manifest["format"] == "implicit" and result.manifest["chat_template_applied"]
    examples = read_examples(result)
    assert [ex["chosen"] for ex in examples] == ["kind<|im_end|>"] * 4
    assert [r["reason"] for r in read_rejects(result)] == ["prompts_differ"]


def test_truncation(tmp_path, make_config, demo_tokenizer):
    prompt = " ".join(f"w{i}" for i in range(60))
    row = {"prompt": prompt, "chosen": " " + "yes " * 40, "rejected": " no"}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    full_prompt = demo_tokenizer(prompt).input_ids
    assert len(full_prompt) > 20

    def run(**tok):
        return read_examples(prepare(make_config(path, tokenize=tok), show_progress=False))[0]

    ex = run(max_length=32, max_prompt_length=20)
    assert ex["prompt_ids"] == full_prompt[-20:] and ex["prompt_truncated"]
    assert len(ex["chosen_ids"]) == 12 and ex["chosen_truncated"]  # 32 - 20
    assert not ex["rejected_truncated"] and ex["rejected_ids"][-1] == demo_tokenizer.eos_token_id
    assert decode(demo_tokenizer, ex["chosen_ids"]) in row["chosen"]

    ex = run(max_length=32, max_prompt_length=20, truncation_mode="keep_start")
    assert ex["prompt_ids"] == full_prompt[:20]

    cfg = make_config(path, tokenize={"max_length": 20, "max_prompt_length": None},
                      data={"max_reject_fraction": 1.0})
    result = prepare(cfg, show_progress=False)
    assert [r["reason"] for r in read_rejects(result)] == ["too_long"]


def test_responses_identical_once_truncated_are_rejected(tmp_path, make_config, demo_tokenizer):
    """Two answers that differ only past the cut are one answer to the policy: the pair is a reject
    with its reason, counted; with room for the difference it is kept."""
    common = " The sky is blue because air scatters short wavelengths more than long ones, " * 3
    rows = [{"prompt": "Why is the sky blue?", "chosen": common + "Rayleigh.", "rejected": common + "Magic."},
            {"prompt": "Why is grass green?", "chosen": " Chlorophyll.", "rejected": " Paint."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    limits = {"max_length": 40, "max_prompt_length": 16}
    result = prepare(make_config(path, tokenize=limits, data={"max_reject_fraction": 1.0}), show_progress=False)
    rejects = read_rejects(result)
    assert [(r["source_row"], r["reason"]) for r in rejects] == [(0, "identical_after_truncation")]
    assert "tokenize.max_length 40" in rejects[0]["detail"]
    assert result.manifest["counts"]["rejected_by_reason"] == {"identical_after_truncation": 1}
    assert [ex["source_row"] for ex in read_examples(result)] == [1]
    roomy = prepare(make_config(path, tokenize={"max_length": 256, "max_prompt_length": 16}), show_progress=False)
    assert sorted(ex["source_row"] for ex in read_examples(roomy)) == [0, 1] and not read_rejects(roomy)


def test_fingerprint_same_inputs_skip_changed_inputs_new_dir(tmp_path, make_config):
    path = write_jsonl(tmp_path / "d.jsonl", standard_rows(30))
    first = prepare(make_config(path), show_progress=False)
    assert not first.skipped
    examples = first.output_dir / "examples.parquet"
    stamp = os.stat(examples).st_mtime_ns
    again = prepare(make_config(path), show_progress=False)
    assert again.skipped and again.output_dir == first.output_dir
    assert os.stat(examples).st_mtime_ns == stamp  # no work was done

    # A performance knob does not change the output's bytes or its directory.
    rebatched = make_config(path, tokenize={"batch_rows": 7})
    assert prepare(rebatched, show_progress=False).output_dir == first.output_dir
    dirs = {first.output_dir}
    for change in ({"tokenize": {"max_length": 2048}}, {"tokenize": {"add_eos": False}},
                   {"data": {"eval_fraction": 0.5}}, {"tokenize": {"truncation_mode": "keep_start"}}):
        result = prepare(make_config(path, **change), show_progress=False)
        assert result.output_dir not in dirs, change
        dirs.add(result.output_dir)
    write_jsonl(path, standard_rows(31))  # new content under the same name
    assert prepare(make_config(path), show_progress=False).output_dir not in dirs


def test_output_bytes_are_deterministic(tmp_path, make_config):
    path = write_jsonl(tmp_path / "d.jsonl", standard_rows(50))
    a = prepare(make_config(path, tokenize={"batch_rows": 7}), show_progress=False)
    data_a = (a.output_dir / "examples.parquet").read_bytes()
    for name in ("examples.parquet", "rejects.parquet", "manifest.json"):
        (a.output_dir / name).unlink()
    b = prepare(make_config(path, tokenize={"batch_rows": 1000}), show_progress=False)
    assert b.output_dir == a.output_dir and not b.skipped
    assert (b.output_dir / "examples.parquet").read_bytes() == data_a


def test_split_is_by_id_and_stable(tmp_path, make_config):
    rows = standard_rows(400)
    a = prepare(make_config(write_jsonl(tmp_path / "a.jsonl", rows), data={"eval_fraction": 0.2}),
                show_progress=False)
    b = prepare(make_config(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), data={"eval_fraction": 0.2}),
                show_progress=False)
    split_a = {ex["id"]: ex["split"] for ex in read_examples(a)}
    split_b = {ex["id"]: ex["split"] for ex in read_examples(b)}
    assert split_a == split_b
    share = sum(s == "eval" for s in split_a.values()) / len(split_a)
    assert 0.13 < share < 0.27  # 400 draws around 0.2


def test_unusable_inputs_fail_clearly(tmp_path, make_config):
    from pipeline.errors import DataError, ModelError

    with pytest.raises(DataError, match="does not exist"):
        prepare(make_config(tmp_path / "missing.jsonl"), show_progress=False)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare(make_config(tmp_path / "d.csv"), show_progress=False)
    path = write_jsonl(tmp_path / "d.jsonl", standard_rows(2))
    with pytest.raises(ModelError, match="neither a folder nor a Hub id"):
        prepare(make_config(path, model_path=tmp_path / "no-model"), show_progress=False)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(PrepareError, match="cannot tell the data format"):
        prepare(make_config(odd), show_progress=False)


def test_glob_pattern_reads_several_files_in_order(tmp_path, make_config):
    """data.path as a glob: the files it matches, sorted, read one after the other (rows
    numbered on across them), equal to the same rows in one file; the manifest lists the files."""
    rows = standard_rows(12)
    lines = [*rows[:5], "{not json", *rows[5:]]
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "part-0.jsonl", lines[:4])
    write_jsonl(parts / "part-1.jsonl", lines[4:9])
    write_jsonl(parts / "part-2.jsonl", lines[9:])
    write_jsonl(parts / "other.txt", ["not matched"])
    several = prepare(make_config(str(parts / "part-*.jsonl")), show_progress=False)
    one = prepare(make_config(write_jsonl(tmp_path / "all.jsonl", lines)), show_progress=False)
    assert read_examples(several) == read_examples(one)  # same rows, ids, token ids, source rows
    assert read_rejects(several) == read_rejects(one) and read_rejects(one)[0]["source_row"] == 5
    source = several.manifest["source"]
    assert source["path"] == str(parts / "part-*.jsonl")
    assert source["files"] == [str(parts / f"part-{i}.jsonl") for i in range(3)]
    assert several.output_dir != one.output_dir  # another input, another fingerprint
    again = prepare(make_config(str(parts / "part-*.jsonl")), show_progress=False)
    assert again.skipped
    write_jsonl(parts / "part-3.jsonl", [standard_rows(13)[12]])  # a new file: a new dataset
    assert prepare(make_config(str(parts / "part-*.jsonl")), show_progress=False).output_dir != several.output_dir


def test_glob_pattern_errors(tmp_path, make_config):
    from pipeline.errors import DataError

    with pytest.raises(DataError, match="matches no file"):
        prepare(make_config(str(tmp_path / "none-*.jsonl")), show_progress=False)
    write_jsonl(tmp_path / "a.jsonl", standard_rows(2))
    pq.write_table(pa.Table.from_pylist(standard_rows(2)), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="different kinds"):
        prepare(make_config(str(tmp_path / "[ab].*")), show_progress=False)
