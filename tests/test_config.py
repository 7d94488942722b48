import pytest

from pipeline.config import ConfigError, config_from_dict, load_config

BASE = {"data": {"path": "d.jsonl"}, "model": {"path": "m"}}


def test_defaults_and_overrides_are_typed():
    cfg = config_from_dict(
        BASE,
        [
            "tokenize.max_length=512",
            "tokenize.max_prompt_length=null",
            "data.eval_fraction=0.25",
            "tokenize.add_eos=false",
            "data.format=implicit",
            "storage=/tmp/x",
        ],
    )
    assert cfg.tokenize.max_length == 512
    assert cfg.tokenize.max_prompt_length is None
    assert cfg.data.eval_fraction == 0.25
    assert cfg.tokenize.add_eos is False
    assert cfg.data.format == "implicit"
    assert cfg.storage == "/tmp/x"
    assert cfg.tokenize.prompt_truncation == "keep_end"  # default


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["tokenize.max_lenght=5"], "tokenize.max_lenght"),
        (["datas.path=x"], "datas"),
        (["tokenize.max_length=long"], "tokenize.max_length"),
        (["tokenize.max_length=1.5"], "tokenize.max_length"),
        (["data.format=xml"], "data.format"),
        (["tokenize.prompt_truncation=middle"], "tokenize.prompt_truncation"),
        (["data.eval_fraction=1.0"], "data.eval_fraction"),
        (["data.eval_fraction=-0.1"], "data.eval_fraction"),
        (["tokenize.add_eos=maybe"], "tokenize.add_eos"),
        (["tokenize.max_prompt_length=2048"], "tokenize.max_prompt_length"),
        (["tokenize.max_length"], "tokenize.max_length"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(BASE, overrides)


def test_required_keys():
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        config_from_dict({"data": {"path": "x"}})
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        config_from_dict({"model": {"path": "x"}})


def test_yaml_paths_resolve_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text("storage: out\ndata:\n  path: d.jsonl\nmodel:\n  path: ../m\n")
    cfg = load_config(path, ["tokenize.max_length=64", "tokenize.max_prompt_length=32"])
    assert cfg.data.path == str(tmp_path / "sub" / "d.jsonl")
    assert cfg.model.path == str(tmp_path / "m")
    assert cfg.storage == str(tmp_path / "sub" / "out")
    assert cfg.tokenize.max_length == 64


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("data: 3\nmodel:\n  path: m\n")
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        load_config(section)
