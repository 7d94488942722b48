"""The flow's typed parameters: pydantic models made from `pipeline.config.schema`'s dataclasses.

Prefect builds a flow's parameter schema from its signature, so typing `config` with these
models gives the UI (and `prefect deployment run --param`) a form: one section per config
section, every key with its type, choices, default and the description written under it in
`pipeline/config/schema.py`. The dataclasses stay the one definition: these models are derived from
them, and the values they validate still go through `config_from_dict` (ranges, paths).

    PipelineConfig.model_validate({"data": {"path": "prefs.jsonl"}, "model": {"path": "m"}})
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from pipeline import STAGES
from pipeline.config.schema import Config

Stage = Literal[STAGES]  # type: ignore[valid-type]  # a Literal of the stage names


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated attribute of a class body (the style of
    pipeline/config/schema.py), by attribute name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def model_of(cls: type) -> type[BaseModel]:
    """A pydantic model with the dataclass's fields, types, defaults and descriptions; nested
    config sections become nested models (optional sections stay optional)."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = model_of(tp)
        elif type(None) in args and len(args) == 2 and dataclasses.is_dataclass(args[0]):
            tp = Optional[model_of(args[0])]
        description = docs.get(f.name)
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (tp, Field(f.default, description=description))
        elif f.default_factory is not dataclasses.MISSING:
            factory = tp if dataclasses.is_dataclass(f.default_factory) else f.default_factory
            fields[f.name] = (tp, Field(default_factory=factory, description=description))
        else:
            fields[f.name] = (tp, Field(description=description))
    return create_model(f"{cls.__name__}Params", __config__=ConfigDict(extra="forbid"), **fields)


PipelineConfig = model_of(Config)
"""The whole configuration, as the `config` parameter of the dpo-pipeline flow."""


def config_dict(config: BaseModel | dict) -> dict:
    """A validated parameter (or a plain dict, when the flow is called without validation) as
    the dict `config_from_dict` takes."""
    return config.model_dump(mode="json") if isinstance(config, BaseModel) else config
