"""Loading the configuration: a YAML file and ``--set`` overrides into a validated ``Config``.

Loaded from YAML, then overridden from the command line with ``--set section.key=value`` (or
``--set 'section={key: value, ...}'``, merged key by key). Float keys take any form ``float()``
takes (``1e-6``, which YAML 1.1 reads as text, ``5E-7``, ``.5``), never NaN or infinity.
Unknown keys and values of the wrong type or out of range are errors that name the key
(``ConfigError``); nothing is silently ignored. Relative paths in a file are relative to the
file; the loaded config holds absolute paths. The schema (sections, keys, defaults, checks) is
pipeline/config/schema.py's.

    cfg = load_config("run.yaml", overrides=["tokenize.max_length=512"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.schema import RENAMED, REQUIRED, Config, is_hub_id
from pipeline.errors import ConfigError

PATH_KEYS = (("data", "path"), ("model", "path"), ("train", "init_from"), ("train", "ref_cache"),
             ("generate", "model"), ("generate", "prompts"), ("judge", "reward_model"))
"""The keys that hold a file or folder path (or, for the HUB_KEYS, a Hub id)."""
HUB_KEYS = ("model", "data", "generate", "judge")
"""The sections whose path keys may also be a Hub id (org/name)."""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as the config type ``tp``, else a ConfigError naming ``key``."""
    if tp is Any:  # a sweep's values: checked by the point's own config
        return value
    origin = typing.get_origin(tp)
    if origin is dict:
        return _coerce_dict(key, value, typing.get_args(tp)[1])
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(key, value, typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return _coerce_list(key, value, item)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp in (bool, int, float, str):
        return _coerce_scalar(key, value, tp)
    if dataclasses.is_dataclass(tp):
        return _build(key, tp, value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module


def _coerce_union(key: str, value: Any, args: tuple) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    errors = []
    for option in inner:  # the first type the value fits
        try:
            return _coerce(key, value, option)
        except ConfigError as exc:
            errors.append((option, exc))
    # Else the error of the list option for a list (it names the bad item), else the last one's.
    listy = isinstance(value, list) or (isinstance(value, str) and value.startswith("["))
    for option, exc in errors:
        if listy and typing.get_origin(option) is list:
            raise exc
    raise errors[-1][1]


def _from_text(value: Any, opener: str) -> Any:
    """A list or mapping written as YAML text (``[a, b]``, ``{a: 1}``) as its value; else as it is."""
    if isinstance(value, str) and value.startswith(opener):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    return value


def _coerce_list(key: str, value: Any, item: Any) -> list:
    value = _from_text(value, "[")  # --set key=[a,b] arrives as text
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]


def _coerce_dict(key: str, value: Any, item: Any) -> dict:
    value = _from_text(value, "{")  # --set 'key={a: 1}' arrives as text
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of keys to values, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: {name!r} is not a key", hint="write dotted config keys, e.g. train.beta")
    return {name: _coerce(f"{key}.{name}", v, item) for name, v in value.items()}


def _coerce_scalar(key: str, value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return _coerce_float(key, value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_float(key: str, value: Any) -> float:
    if isinstance(value, str):
        # YAML 1.1 reads 1e-6 and 5E-7 (no dot) as text; TRL recipes write learning rates so.
        # Any form float() takes, here and in --set; nan and inf are refused below.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number", hint="set a finite value")
    return float(value)


def _build(prefix: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        old = f"{prefix}.{key}" if prefix else key
        if old in RENAMED:
            raise ConfigError(f"{old} is now called {RENAMED[old]}, as in Hugging Face / TRL", hint="rename the key")
    if unknown:
        where = f"{prefix}." if prefix else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(key, raw[name], hints[name])
        elif f.default is REQUIRED and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(key, hints[name], {})
            else:
                raise ConfigError(f"{key} is required", hint=f"set it in the YAML file or with --set {key}=...")
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set tokenize.max_length=512")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    # YAML scalar syntax: 512 -> int, 0.1 -> float, true -> bool, null -> None, else a string.
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(
            f"--set {item!r}: the value of {key} is not valid YAML ({problem}); quote it to "
            f"pass it as text, e.g. --set '{key}=\"...\"'"
        ) from None
    parts = key.split(".")
    # A mapping for a section (--set 'train.peft={r: 8, lora_alpha: 16}') is merged key by key, as
    # the dotted form (--set train.peft.r=8 ...) is; any other list or mapping stays text, which
    # list keys parse themselves (--set train.loss_type=[sigmoid,sft]).
    if isinstance(value, (dict, list)) and not (isinstance(value, dict) and _is_section(parts)):
        value = text
    return parts, value


def _section_class(tp: Any) -> Any:
    """The dataclass of a section's type hint (Optional[PeftConfig]: PeftConfig), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _is_section(parts: list[str]) -> bool:
    """Whether the dotted key ``parts`` names a section (train, train.peft) of Config."""
    tp: Any = Config
    for part in parts:
        cls = _section_class(tp)
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if part not in hints:
            return False
        tp = hints[part]
    return _section_class(tp) is not None


def _set_override(raw: dict, item: str, parts: list[str], value: Any) -> None:
    """Set ``parts`` (a dotted key) to ``value`` in ``raw``; a mapping for a section is merged
    into what the section already holds, key by key."""
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # absent, or null in the file (train.peft: null): a new section
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    if not isinstance(value, dict):
        node[parts[-1]] = value
        return
    if node.get(parts[-1]) is None:  # train.peft={} makes the section with its defaults
        node[parts[-1]] = {}
    for key, inner in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"--set {item!r}: {key!r} is not a key of {'.'.join(parts)}")
        _set_override(raw, item, [*parts, key], inner)


def config_from_dict(raw: dict, overrides: list[str] | None = None) -> Config:
    raw = _deep_copy(raw or {})
    for item in overrides or []:
        parts, value = _parse_override(item)
        _set_override(raw, item, parts, value)
    cfg = _build("", Config, raw)
    cfg.validate()
    # Absolute paths, so a config handed to another process (a flow's child, a deployment) means
    # the same files wherever it runs from.
    cfg.storage = str(Path(cfg.storage).resolve())
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key, None)  # an absent optional section: None
        if value and not (section in HUB_KEYS and is_hub_id(value)):
            setattr(getattr(cfg, section), key, str(Path(value).resolve()))
    return cfg


def config_with(raw: dict, values: dict[str, Any]) -> Config:
    """``raw`` (a config's sections) with each dotted key of ``values`` set to its value, already
    parsed (a sweep point's), then built and validated like any config."""
    raw = _deep_copy(raw or {})
    for key, value in values.items():
        _set_override(raw, f"{key}={value!r}", key.split("."), value)
    return config_from_dict(raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({exc}): save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc, text)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        base = path.parent
        # Relative paths in a config file are relative to the file, not to the current directory.
        for section, key in PATH_KEYS:
            value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                if section in HUB_KEYS and is_hub_id(value, base):
                    continue  # a Hub id, not a folder next to the config
                raw[section][key] = str((base / value).resolve())
        if isinstance(raw.get("storage"), str) and not Path(raw["storage"]).is_absolute():
            raw["storage"] = str((base / raw["storage"]).resolve())
    return config_from_dict(raw, overrides)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line: where (line and column, from 1) and what PyYAML found wrong."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(getattr(exc, "position", None), int):  # ReaderError: a character YAML refuses
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    else:
        line = column = None
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        what = f"the character {f'#x{char:04x}' if isinstance(char, int) else repr(char)} is not allowed in YAML"
    else:
        what = getattr(exc, "problem", None) or str(exc)
        context, started = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and started is not None and started is not mark:
            context = f"{context} started at line {started.line + 1}, column {started.column + 1}"
        if context:
            what = f"{what} ({context})"
    what = " ".join(str(what).split())
    return f"line {line}, column {column}: {what}" if line is not None else what


def _deep_copy(raw):
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
