"""The README's configuration reference (``scripts/config_reference.py``) matches the code, and lists every option of
every registered stage — nested options included — with its default, as pydantic's own JSON schema of each options
model has them (an independent walk of the same models)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gestalt_xai.config import PipelineConfig
from gestalt_xai.stages import load_stages

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "config_reference.py"


@pytest.fixture(scope="module")
def reference_module():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbour readme_results
    try:
        spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_readme_reference_matches_the_code() -> None:
    # a fresh interpreter: only the stages the entry points register (a test may register more in this one)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout


def test_check_fails_on_a_stale_readme_and_writing_fixes_it(reference_module, tmp_path) -> None:
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    readme.write_text(text.replace("| `seed` | int | `0` |", "| `seed` | int | `1` |", 1), encoding="utf-8")
    assert reference_module.main(["--readme", str(readme), "--check"]) == 1
    assert reference_module.main(["--readme", str(readme)]) == 0
    assert reference_module.main(["--readme", str(readme), "--check"]) == 0
    readme.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="config-reference:start"):
        reference_module.main(["--readme", str(readme), "--check"])


# ------------------------------------------------------------------------ the independent walk: JSON schema
def _schema_fields(model: type) -> dict[str, dict[str, Any]]:
    """Every field path of ``model`` (``a``, ``a.b``, ``a[].b``, ``a.*.b``) → its JSON-schema property."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.get("$defs", {})
    fields: dict[str, dict[str, Any]] = {}

    def resolve(node: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        ref = node.get("$ref")
        return (defs[ref.split("/")[-1]], ref) if ref else (node, None)

    def nested(node: dict[str, Any], path: str, seen: tuple[str, ...]) -> None:
        node, ref = resolve(node)
        if ref in seen:
            return
        if "properties" in node:
            properties(node, f"{path}.", (*seen, ref or ""))
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                nested(sub, path, seen)
        for sub in [node["items"]] if isinstance(node.get("items"), dict) else []:
            nested(sub, f"{path}[]", seen)
        for sub in node.get("prefixItems", []):
            nested(sub, f"{path}[]", seen)
        if isinstance(node.get("additionalProperties"), dict):
            nested(node["additionalProperties"], f"{path}.*", seen)

    def properties(node: dict[str, Any], prefix: str, seen: tuple[str, ...]) -> None:
        for name, prop in node["properties"].items():
            fields[f"{prefix}{name}"] = {**prop, "required": name in node.get("required", [])}
            nested(prop, f"{prefix}{name}", seen)

    properties(schema, "", ("#/$defs/" + schema.get("title", ""),))
    return fields


def _sections(text: str) -> dict[str, dict[str, list[str]]]:
    """Section heading → option path → its cells (type, default, description), from the generated Markdown."""
    out: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = out.setdefault(line[4:].strip().strip("`"), {})
        elif current is not None and line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current[cells[0].strip("`")] = cells[1:]
    return out


def test_every_option_of_every_stage_appears_with_its_default(reference_module) -> None:
    stages = load_stages()
    sections = _sections(reference_module.reference(stages))
    models = {"Pipeline file": PipelineConfig, **{name: spec.options for name, spec in stages.items()}}
    assert list(sections) == list(models), "one section per registered stage, in pipeline order"
    nested = 0
    for name, model in models.items():
        expected = _schema_fields(model)
        assert set(sections[name]) == set(expected), f"{name}: {sorted(set(sections[name]) ^ set(expected))}"
        for path, prop in expected.items():
            default = sections[name][path][1]
            if prop["required"]:
                assert default == "required", f"{name}.{path}"
            elif "default" in prop:
                value = prop["default"]
                root = str(reference_module.ROOT) + "/"
                if isinstance(value, str) and value.startswith(root):  # a shipped file, shown relative to the repo
                    value = value[len(root):]
                assert default == f"`{json.dumps(value, ensure_ascii=False)}`", f"{name}.{path}"
            if prop.get("description"):
                assert sections[name][path][2] == " ".join(prop["description"].split()), f"{name}.{path}"
        nested += sum("." in p for p in expected)
    assert nested, "the stages' nested options (e.g. assess's faithfulness.steps) are walked too"
    assert "faithfulness.steps" in sections["assess"] and "models[].randomise" in sections["explain"]
