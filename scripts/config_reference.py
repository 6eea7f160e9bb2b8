"""Write the configuration reference into README.md, between ``<!-- config-reference:start -->`` and
``<!-- config-reference:end -->``: the pipeline file's keys, then every registered stage
(:func:`gestalt_xai.stages.load_stages`, in pipeline order) with each field of its options model — nested models'
fields too, as dotted paths (``faithfulness.steps``; ``sources[].format`` for a list of models) — its type and
constraints, its default and its description, all read from the pydantic models. A stage another package registers
through the ``gestalt_xai.stages`` entry points appears as well.

Usage: python scripts/config_reference.py [--readme README.md] [--check]

``--check`` writes nothing and exits 1 when the README's section differs from what the code gives (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from readme_results import _replace  # the README's marker sections are filled the same way

from gestalt_xai.config import PipelineConfig
from gestalt_xai.stages import Stage, load_stages

SECTION = "config-reference"
_BOUNDS = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"))
_UNIONS = (typing.Union, types.UnionType)


# --------------------------------------------------------------------------------------------------- types
def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def type_name(tp: Any) -> str:
    """A short, readable name of an annotation: ``list[str] | null``, ``"png" | "svg"``, ``FaithfulnessOptions``.

    >>> type_name(list[Literal["png", "svg"]] | None)
    'list["png" | "svg"] | null'
    """
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in args)
    if origin in _UNIONS:
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def constraints(field: FieldInfo) -> str:
    """The field's bounds and length limits (``≥ 1, ≤ 10``; ``at least 1 item``)."""
    out = []
    for meta in field.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{sign} {getattr(meta, attr)}")
        if isinstance(meta, at.MinLen) and meta.min_length:
            out.append(f"at least {meta.min_length} item{'s' * (meta.min_length != 1)}")
        if isinstance(meta, at.MaxLen):
            out.append(f"at most {meta.max_length} items")
    return ", ".join(out)


def nested_models(tp: Any, path: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """``(path, model)`` for each options model inside the annotation ``tp`` of the field at ``path``: the field
    itself (``path``), items of a list (``path[]``) or values of a mapping (``path.*``)."""
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield path, tp
    elif origin in _UNIONS:
        for a in args:
            yield from nested_models(a, path)
    elif origin in (list, tuple, set, frozenset):
        for a in args:
            if a is not Ellipsis:
                yield from nested_models(a, f"{path}[]")
    elif origin is dict and len(args) == 2:
        yield from nested_models(args[1], f"{path}.*")


#: the repository (files it ships are shown relative to it)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- rows
def default_text(field: FieldInfo) -> str:
    """The default as JSON (``required`` when there is none; ``{…}`` for a nested model described below it)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "{…}"
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(ROOT):
        value = value.relative_to(ROOT).as_posix()  # a file shipped with the package: the same on every machine
    return f"`{json.dumps(to_jsonable_python(value), ensure_ascii=False)}`"


def rows(model: type[BaseModel], prefix: str = "", seen: tuple[type, ...] = ()) -> Iterator[dict[str, str]]:
    """One row per field of ``model`` (dotted path, type with constraints, default, description), each nested
    model's fields right after the field that holds it."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        kind = type_name(field.annotation)
        limits = constraints(field)
        yield {"option": path, "type": f"{kind} ({limits})" if limits else kind, "default": default_text(field),
               "description": " ".join((field.description or "").split())}
        for sub_path, sub in nested_models(field.annotation, path):
            if sub not in seen:
                yield from rows(sub, f"{sub_path}.", (*seen, model))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(model: type[BaseModel], first: str = "option") -> list[str]:
    """The Markdown table of :func:`rows`."""
    lines = [f"| {first} | type | default | description |", "|---|---|---|---|"]
    for r in rows(model):
        lines.append(f"| `{_cell(r['option'])}` | {_cell(r['type'])} | {_cell(r['default'])} | "
                     f"{_cell(r['description'])} |")
    return lines


def stage_section(spec: Stage) -> list[str]:
    """A stage's heading, summary, options model and example, and its options table."""
    model = spec.options
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    head = [f"### `{spec.name}`", "", f"{spec.summary[:1].upper()}{spec.summary[1:]}. Options model "
            f"`{model.__module__}.{model.__qualname__}`" + (f" ({doc.rstrip('.')})" if doc else "") + "."]
    if spec.example:
        head += ["", f"Example: `{spec.example}`"]
    lines = table(model)
    # folded: the README stays readable, GitHub and most Markdown viewers open a table with one click
    return [*head, "", f"<details><summary>{len(lines) - 2} options</summary>", "", *lines, "", "</details>", ""]


def reference(stages: dict[str, Stage] | None = None) -> str:
    """The whole section: the pipeline file's keys, then each stage's options."""
    stages = load_stages() if stages is None else stages
    out = ["Generated from the options models by `python scripts/config_reference.py` (a test checks that it matches "
           "the code). Every option can be given in a pipeline file (`- explain: {methods: [gradcam]}`), in a YAML "
           "file (`--config`), as `--set key=value` (dotted keys for nested options: `--set faithfulness.steps=8`) "
           "and, for simple types, as a flag (`--min-subjects 5`). A default written `{…}` is a nested group whose "
           "fields follow; `x[].y` is the field `y` of each item of the list `x`. Unknown keys are errors.", "",
           "### Pipeline file", "", *table(PipelineConfig, first="key"), ""]
    for spec in stages.values():
        out += stage_section(spec)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; write nothing")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    updated = _replace(text, SECTION, reference(), args.readme)
    if args.check:
        if updated != text:
            print(f"{args.readme}: the configuration reference is out of date; run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        print(f"{args.readme}: the configuration reference is up to date")
        return 0
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
    print(f"{args.readme}: configuration reference written ({len(re.findall(r'^### ', reference(), re.M))} "
          "sections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
