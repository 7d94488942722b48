import pytest

from pipeline.config.load import config_from_dict, load_config
from pipeline.errors import ConfigError

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
    assert cfg.tokenize.truncation_mode == "keep_end"  # default


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["tokenize.max_lenght=5"], "tokenize.max_lenght"),
        (["datas.path=x"], "datas"),
        (["tokenize.max_length=long"], "tokenize.max_length"),
        (["tokenize.max_length=1.5"], "tokenize.max_length"),
        (["data.format=xml"], "data.format"),
        (["tokenize.truncation_mode=middle"], "tokenize.truncation_mode"),
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


# --- issue 9 §2: bad configuration is a ConfigError naming the key ---------------------------------

FLOAT_KEYS = [
    "data.eval_fraction", "data.max_reject_fraction", "score.gpu_memory_utilization",
    "train.beta", "train.label_smoothing", "train.rpo_alpha", "train.learning_rate", "train.num_train_epochs",
    "train.warmup_ratio",
    "train.weight_decay", "train.max_grad_norm", "train.step0_tolerance", "audit.tolerance",
    "train.f_alpha_divergence_coef", "train.discopop_tau", "train.dpop_lambda", "train.simpo_gamma", "train.ld_alpha",
    "generate.temperature", "generate.top_p", "pairs.min_margin", "rounds.eval_temperature",
]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "1.0e+400", "nan", "inf", "-Infinity", "1e400",
                                   "'1e-6e'"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused(key, value):
    expected = "expected a number" if "e-6e" in value else "finite"
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .*{expected}"):
        config_from_dict(BASE, [f"{key}={value}"])


# --- issue 20 §3: every float key takes what Python's float() takes --------------------------------

# YAML 1.1 reads 1e-6 (no dot) as text; TRL recipes and README write learning rates so.
FLOAT_FORMS = {"1e-6": 1e-6, "5E-7": 5e-7, ".5": 0.5, "1e+2": 100.0, "'0.25'": 0.25, "3": 3.0, "-2e-3": -2e-3}


@pytest.mark.parametrize("text, number", FLOAT_FORMS.items())
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_float_keys_take_what_float_takes_in_set_and_in_a_file(key, text, number, tmp_path):
    section, name = key.split(".")
    for cfg in _with_value(key, text, tmp_path):
        value = getattr(getattr(cfg, section), name)
        assert type(value) is float and value == number, (key, text, value)


def _with_value(key, text, tmp_path):
    """Configs with ``key`` set to ``text`` by --set and by a YAML file; values out of the key's
    range are skipped (ConfigError naming the range, not the form)."""
    section, name = key.split(".")
    path = tmp_path / f"{name}.yaml"
    sections = {"data": ["path: d.jsonl"], "model": ["path: m"]}
    sections.setdefault(section, []).append(f"{name}: {text}")  # the text as written, unquoted
    path.write_text("".join(f"{s}:\n" + "".join(f"  {line}\n" for line in lines) for s, lines in sections.items()))
    for make in (lambda: config_from_dict(BASE, [f"{key}={text}"]), lambda: load_config(path)):
        try:
            yield make()
        except ConfigError as exc:
            assert "expected a number" not in str(exc) and "finite" not in str(exc), exc
            assert key in str(exc)


def test_readme_learning_rate_forms():
    """README, "Train on your model and data": --set train.learning_rate=1e-6; a file's 5e-7."""
    assert config_from_dict(BASE, ["train.learning_rate=1e-6"]).train.learning_rate == 1e-6
    assert config_from_dict({**BASE, "train": {"learning_rate": "5e-7"}}).train.learning_rate == 5e-7
    with pytest.raises(ConfigError, match=r"train\.learning_rate: expected a number, got '1e-6x'"):
        config_from_dict(BASE, ["train.learning_rate=1e-6x"])
    with pytest.raises(ConfigError, match=r"train\.loss_weights\[1\]: .*finite"):
        config_from_dict(BASE, ["train.loss_type=[sigmoid,sft]", "train.loss_weights=[1e-1, nan]"])
    cfg = config_from_dict(BASE, ["train.loss_type=[sigmoid,sft]", "train.loss_weights=[1e-1, 5E-1]"])
    assert cfg.train.loss_weights == [0.1, 0.5]


def test_integer_keys_stay_integers():
    for text in ("1e3", "'512'", "5.0"):
        with pytest.raises(ConfigError, match=r"tokenize\.max_length: expected an integer"):
            config_from_dict(BASE, [f"tokenize.max_length={text}"])


# --- issue 20 §4: a mapping in --set, YAML errors, folder names ------------------------------------


def test_a_mapping_for_a_section_in_set_works_like_the_dotted_form():
    mapping = config_from_dict(BASE, ["train.peft={r: 8, lora_alpha: 16}"])
    dotted = config_from_dict(BASE, ["train.peft.r=8", "train.peft.lora_alpha=16"])
    assert mapping.train.peft == dotted.train.peft and mapping.train.peft.r == 8
    # merged into what the file says, key by key, as the dotted form is
    raw = {**BASE, "train": {"peft": {"r": 4, "lora_dropout": 0.1}, "beta": 0.2}}
    merged = config_from_dict(raw, ["train.peft={r: 8, lora_alpha: 16}"]).train
    assert (merged.peft.r, merged.peft.lora_alpha, merged.peft.lora_dropout, merged.beta) == (8, 16.0, 0.1, 0.2)
    later = config_from_dict(BASE, ["train.peft={r: 8, lora_alpha: 16}", "train.peft.lora_dropout=5e-2"]).train.peft
    assert (later.r, later.lora_dropout) == (8, 0.05)
    nested = config_from_dict(BASE, ["train={peft: {r: 2, target_modules: [q_proj, v_proj]}, learning_rate: 1e-5}"])
    assert nested.train.peft.target_modules == ["q_proj", "v_proj"] and nested.train.learning_rate == 1e-5
    assert config_from_dict(BASE, ["train.peft={}"]).train.peft.r == 8  # the section with its defaults
    # a section that is null in the file takes keys, in either form
    for item in ("train.peft.r=4", "train.peft={r: 4}"):
        assert config_from_dict({**BASE, "train": {"peft": None}}, [item]).train.peft.r == 4
    assert config_from_dict(BASE, ["train.peft={r: 4}", "train.peft=null"]).train.peft is None


def test_a_mapping_in_set_names_a_bad_key():
    with pytest.raises(ConfigError, match=r"unknown key train\.peft\.rank"):
        config_from_dict(BASE, ["train.peft={rank: 8}"])
    with pytest.raises(ConfigError, match=r"train\.peft\.r: expected an integer"):
        config_from_dict(BASE, ["train.peft={r: eight}"])
    with pytest.raises(ConfigError, match=r"train\.run_name: .*not a safe folder name"):
        config_from_dict(BASE, ["train.run_name={a: b}"])  # not a section: the text, refused as a name


@pytest.mark.parametrize("text, line, column", [
    ("data: [1, 2\n", 2, 1),
    ("data:\n  path: d.jsonl\nmodel:\n\tpath: m\n", 4, 1),
    ("data:\n  path: a: b\n", 2, 10),
    ("data:\n  path: 'unclosed\nmodel: {}\n", 4, 1),
    ("data:\n  path: x\u0007y\n", 2, 10),
])
def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"config file {path} is not valid YAML: line {line}, column {column}: "), message


FOLDER_NAMES = ["train.run_name", "data.split", "data.name", "data.data_dir", "sweep.name"]


def test_every_folder_name_key_is_checked():
    from pipeline.config.schema import FOLDER_NAME_KEYS

    assert sorted(FOLDER_NAME_KEYS) == sorted(FOLDER_NAMES)


@pytest.mark.parametrize("key", FOLDER_NAMES)
@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a b", "a\x00b", "x" * 101, "-flag", "a\\b", "a:b", "*", ""])
def test_values_that_become_folder_names_are_checked_like_run_name(key, name):
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .*not a safe folder name.*letters, digits"):
        config_from_dict({**BASE, section: {**BASE.get(section, {}), field: name}})


@pytest.mark.parametrize("name", ["a/b", "/a", "a/", "a//b", "a/../b", "a/./b"])
def test_slashes_only_between_safe_parts_of_data_split_and_name(name):
    for key in ("data.split", "data.name", "train.run_name"):
        section, field = key.split(".")
        with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: .*not a safe folder name"):
            config_from_dict({**BASE, section: {**BASE.get(section, {}), field: name}})
    if name != "a/b":
        with pytest.raises(ConfigError, match=r"data\.data_dir: .*not a safe folder name"):
            config_from_dict({**BASE, "data": {"path": "d.jsonl", "data_dir": name}})


@pytest.mark.parametrize("key, name", [("data.split", "test"), ("data.split", "validation_0.5"),
                                       ("data.name", "wikitext-2-raw-v1"), ("data.data_dir", "harmless-base"),
                                       ("data.data_dir", "data/en"), ("train.run_name", "demo")])
def test_safe_folder_names_are_kept(key, name):
    section, field = key.split(".")
    cfg = config_from_dict({**BASE, section: {**BASE.get(section, {}), field: name}})
    assert getattr(getattr(cfg, section), field) == name


def test_every_float_key_is_covered():
    # A new float key must be added to FLOAT_KEYS above (and is then checked for NaN/inf).
    import typing
    from dataclasses import fields, is_dataclass

    from pipeline.config.schema import Config

    found = []
    for name, section in typing.get_type_hints(Config).items():
        section = next((a for a in typing.get_args(section) if is_dataclass(a)), section)  # Optional[...]
        if is_dataclass(section):
            hints = typing.get_type_hints(section)
            for f in fields(section):
                if float in (hints[f.name], *typing.get_args(hints[f.name])):
                    found.append(f"{name}.{f.name}")
    assert sorted(found) == sorted(FLOAT_KEYS)


def test_non_finite_numbers_in_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: d.jsonl\nmodel:\n  path: m\ntrain:\n  beta: .nan\n")
    with pytest.raises(ConfigError, match=r"train\.beta: .*finite"):
        load_config(path)


def test_zero_learning_rate_is_refused_with_what_to_set():
    with pytest.raises(ConfigError, match=r"train\.learning_rate.*positive.*train\.learning_rate=") as err:
        config_from_dict(BASE, ["train.learning_rate=0"])
    assert "nothing" in str(err.value)


def test_negative_step0_tolerance_is_refused():
    with pytest.raises(ConfigError, match=r"train\.step0_tolerance"):
        config_from_dict(BASE, ["train.step0_tolerance=-1"])


@pytest.mark.parametrize("item", ["train.run_name=a: b: c", "train.run_name=[1, 2", "data.path={x: ]",
                                  "train.run_name=\"unclosed", "train.run_name=@x"])
def test_invalid_yaml_in_an_override_names_the_override(item):
    with pytest.raises(ConfigError, match=r"--set .*train\.run_name|--set .*data\.path") as err:
        config_from_dict(BASE, [item])
    assert "YAML" in str(err.value) and "quote" in str(err.value)


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  path: d\u00e9.jsonl\nmodel:\n  path: m\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8") as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "name",
    ["a\x00b", "x" * 300, "a b", "run/1", "..", ".hidden", "-flag", "a\\b", "a:b", "tab\there",
     "new\nline", "caf\u00e9\u200b", "*", ""],
)
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"train\.run_name.*letters, digits"):
        config_from_dict({**BASE, "train": {"run_name": name}})


@pytest.mark.parametrize("name", ["demo", "run-1", "exp_2024.05.01", "A" * 100])
def test_safe_run_names_are_kept(name):
    assert config_from_dict({**BASE, "train": {"run_name": name}}).train.run_name == name


@pytest.mark.parametrize("old, new", [
    ("train.lr", "train.learning_rate"), ("train.batch_size", "train.per_device_train_batch_size"),
    ("train.grad_accum", "train.gradient_accumulation_steps"), ("train.epochs", "train.num_train_epochs"),
    ("train.schedule", "train.lr_scheduler_type"), ("train.eval_every", "train.eval_steps"),
    ("train.save_every", "train.save_steps"), ("train.keep_checkpoints", "train.save_total_limit"),
    ("train.loss", "train.loss_type"), ("train.sft_weight", "train.rpo_alpha"),
    ("tokenize.prompt_truncation", "tokenize.truncation_mode"),
])
def test_old_names_are_refused_with_the_new_name(old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"{old.replace('.', '[.]')} is now called {new.replace('.', '[.]')}"):
        config_from_dict(BASE, [f"{old}=1"])
    section, key = old.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  path: d.jsonl\nmodel:\n  path: m\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=new.replace(".", "[.]")):
        load_config(path)
