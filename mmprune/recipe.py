"""Recipes: YAML files that read like a compression plan, validated before any model is loaded.

A recipe has `model`, `data`, `passes` (an ordered list of `{pass_name: {params}}`), and optionally
`evaluation`, `output` and `seed`. Every error names the file, the line, the field path and, for a
misspelt name, the nearest valid one. YAML is safe-loaded; recipe text is never evaluated.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmprune.errors import RecipeError, did_you_mean
from mmprune.plugins.manager import Registry

MODEL_SOURCES = ("tiny", "zoo", "hf", "path")


class ModelSpec(BaseModel):
    """Where the model comes from: exactly one of `tiny`, `zoo`, `hf`, `path`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tiny: str | None = Field(None, description="Family of a small random model built from a config "
                                               "(e.g. 'clip'); for tests and smoke runs.")
    zoo: str | None = Field(None, description="A MiniVL zoo model (see `mmprune zoo list`); "
                                              "trained into the cache on first use.")
    hf: str | None = Field(None, description="A Hugging Face hub id or a local directory saved "
                                             "with save_pretrained.")
    path: str | None = Field(None, description="A local model directory: an HF checkpoint or an "
                                               "mmprune export (with mmprune.json).")
    config: dict[str, Any] | None = Field(None, description="With `tiny`: overrides of the tiny "
                                          "model's config, e.g. {vision_config: {num_hidden_layers: 6}}.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel. 'eager' materialises attention maps (slower).")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        given = [s for s in MODEL_SOURCES if getattr(self, s) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one model source of {', '.join(MODEL_SOURCES)} "
                             f"(got {', '.join(given) or 'none'})")
        if self.config is not None and self.tiny is None:
            raise ValueError("`config` overrides apply to `tiny` models only")
        return self

    @property
    def source(self) -> tuple[str, str]:
        return next((s, getattr(self, s)) for s in MODEL_SOURCES if getattr(self, s) is not None)


class EvaluationSpec(BaseModel):
    """How the baseline and final measurements of every run are taken."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    split: str = Field("test", description="Data split the report's metrics come from.")
    batch_size: int = Field(32, ge=1, description="Batch size for metric evaluation.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on at most this many "
                                                            "examples (default: the whole split).")
    latency_batch_size: int = Field(32, ge=1, description="Batch size of the timed forwards "
                                                          "(large enough to be compute-bound).")
    latency_repeats: int = Field(15, ge=3, description="Timed forwards per model; the median is "
                                                       "reported.")
    latency_warmup: int = Field(3, ge=0, description="Untimed forwards before timing.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while timing "
                                                        "(default: leave torch's setting).")


@dataclass(frozen=True)
class DataSpec:
    source: str
    params: BaseModel
    line: int | None = None


@dataclass(frozen=True)
class PassSpec:
    index: int
    name: str
    params: BaseModel
    line: int | None = None


@dataclass
class Recipe:
    path: Path | None
    model: ModelSpec
    data: DataSpec
    passes: list[PassSpec]
    evaluation: EvaluationSpec
    output: str
    seed: int
    raw: dict = field(default_factory=dict)
    lines: dict[tuple, int] = field(default_factory=dict)   # field path -> line in the file

    def to_dict(self) -> dict:
        """The recipe after overrides, as plain data (what the run directory records)."""
        return copy.deepcopy(self.raw)


TOP_LEVEL = {"model", "data", "passes", "evaluation", "output", "seed"}


# ----------------------------------------------------------------------------- YAML with lines

def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Field path -> 1-based line of the key (or item) that introduces it."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (str(key.value),)
            out.setdefault(sub, key.start_mark.line + 1)
            _line_map(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}. Pass the path of a YAML recipe, "
                          "for example recipes/quickstart.yaml.")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory, not a recipe file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start}): a recipe is a YAML text file.",
                          file=str(path)) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}.", file=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError(f"malformed YAML: {exc.problem or exc}", file=str(path), line=line) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"malformed YAML: {exc}", file=str(path)) from None
    return data, (_line_map(node) if node is not None else {})


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[tuple, Any]:
    """'passes.2.prune_structured.target=0.5' -> (('passes', 2, 'prune_structured', 'target'), 0.5)."""
    if "=" not in text:
        raise RecipeError(f"--set expects key=value, got '{text}' "
                          "(for example --set passes.0.prune_structured.target=0.5).")
    key, value = text.split("=", 1)
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError(f"--set has an empty key in '{text}'.")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_override(data: dict, parts: tuple, value: Any, text: str) -> None:
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(map(str, parts[: depth + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"--set {text}: '{where}' is not an index of a list of "
                                  f"{len(node)} item(s).", field=where)
            if node[part] is None:
                node[part] = {}
            node = node[part]
        elif isinstance(node, dict):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        else:
            raise RecipeError(f"--set {text}: '{where}' is not a mapping or list.", field=where)
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"--set {text}: index {last} is outside the list.", field=".".join(map(str, parts)))
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {text}: cannot set a field inside a scalar.", field=".".join(map(str, parts)))


# ----------------------------------------------------------------------------- validation

class _Where:
    """Turns field paths into (file, line) for error messages, knowing which came from --set."""

    def __init__(self, file: str | None, lines: dict[tuple, int], overridden: dict[tuple, str]):
        self.file, self.lines, self.overridden = file, lines, overridden

    def error(self, path: tuple, message: str) -> RecipeError:
        dotted = ".".join(map(str, path)) or None
        for k, text in self.overridden.items():
            if path and path[: len(k)] == k:
                return RecipeError(f"{message} (value from --set {text})", file=self.file, field=dotted)
        line = None
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                line = self.lines[path[:cut]]
                break
        return RecipeError(message, file=self.file, line=line, field=dotted)

    def pydantic(self, base: tuple, model: type[BaseModel], exc: ValidationError) -> RecipeError:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if p != "__root__")
        path = base + loc
        if err["type"] == "extra_forbidden":
            msg = f"unknown parameter '{loc[-1]}'." + did_you_mean(str(loc[-1]), model.model_fields)
        else:
            msg = err["msg"].rstrip(".")
            if "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
            desc = _describe(model, loc)
            msg += f". {desc}" if desc else "."
        more = len(exc.errors()) - 1
        if more:
            msg += f" ({more} more problem{'s' if more > 1 else ''} in this block.)"
        return self.error(path, msg)


def _describe(model: type[BaseModel], loc: tuple) -> str:
    if loc and isinstance(loc[0], str) and loc[0] in model.model_fields:
        f = model.model_fields[loc[0]]
        return f"'{loc[0]}': {f.description}" if f.description else ""
    return ""


def _validate(model: type[BaseModel], data: Any, base: tuple, where: _Where) -> BaseModel:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise where.error(base, f"expected a mapping of parameters, got {type(data).__name__} {data!r}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise where.pydantic(base, model, exc) from None


def _single_key(entry: Any, path: tuple, where: _Where, what: str) -> tuple[str, Any]:
    if isinstance(entry, str):
        return entry, None
    if not isinstance(entry, dict) or len(entry) != 1:
        raise where.error(path, f"each {what} is a mapping with one key, the name "
                                f"(for example '- prune_structured: {{target: 0.5}}'), got {entry!r}.")
    return next(iter(entry.items()))


def _validate_data(raw: Any, registry: Registry, where: _Where) -> DataSpec:
    if not isinstance(raw, dict) or not raw:
        raise where.error(("data",), "expected a mapping naming a dataset source and task, "
                                     f"for example 'data: {{synthetic: retrieval}}'. Sources: "
                                     f"{', '.join(sorted(registry.datasets))}.")
    sources = [k for k in raw if k in registry.datasets]
    if len(sources) != 1:
        unknown = next((k for k in raw if k not in registry.datasets), None)
        if not sources and unknown is not None:
            raise where.error(("data", unknown), f"unknown dataset source '{unknown}'."
                              + did_you_mean(unknown, registry.datasets))
        raise where.error(("data",), f"name exactly one dataset source, got {sources}.")
    source = sources[0]
    cls = registry.datasets[source]
    params = {k: v for k, v in raw.items() if k != source}
    params[cls.task_field] = raw[source]
    try:
        parsed = cls.Params.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(source if p == cls.task_field else p for p in err["loc"])
        exc_path = ("data",) + loc
        if err["type"] == "extra_forbidden":
            raise where.error(exc_path, f"unknown field '{loc[-1]}' for dataset source '{source}'."
                              + did_you_mean(str(loc[-1]), [f for f in cls.Params.model_fields
                                                            if f != cls.task_field])) from None
        raise where.pydantic(("data",), cls.Params, exc) from None
    return DataSpec(source, parsed, where.lines.get(("data",)))


def validate_recipe(data: Any, registry: Registry, *, file: str | None = None,
                    lines: dict[tuple, int] | None = None,
                    overridden: dict[tuple, str] | None = None) -> Recipe:
    where = _Where(file, lines or {}, overridden or {})
    if not isinstance(data, dict):
        raise where.error((), "a recipe is a YAML mapping with keys model, data, passes "
                              "(and optionally evaluation, output, seed).")
    for key in data:
        if key not in TOP_LEVEL:
            raise where.error((str(key),), f"unknown recipe field '{key}'." + did_you_mean(str(key), TOP_LEVEL))
    for key in ("model", "data", "passes"):
        if key not in data:
            raise where.error((), f"missing required field '{key}'.")

    model = _validate(ModelSpec, data["model"], ("model",), where)
    dspec = _validate_data(data["data"], registry, where)
    evaluation = _validate(EvaluationSpec, data.get("evaluation"), ("evaluation",), where)

    raw_passes = data["passes"]
    if not isinstance(raw_passes, list) or not raw_passes:
        raise where.error(("passes",), "expected a non-empty list of passes, "
                                       "for example '- score_taylor: {}'.")
    passes = []
    for i, entry in enumerate(raw_passes):
        name, params = _single_key(entry, ("passes", i), where, "pass")
        if name not in registry.passes:
            raise where.error(("passes", i, str(name)), f"unknown pass '{name}'."
                              + did_you_mean(str(name), registry.passes))
        cls = registry.passes[name]
        parsed = _validate(cls.Params, params, ("passes", i, name), where)
        passes.append(PassSpec(i, name, parsed, where.lines.get(("passes", i))))

    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise where.error(("seed",), f"seed must be an integer in [0, 2**31), got {seed!r}.")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise where.error(("output",), f"output must be a directory path, got {output!r}.")
    stem = Path(file).stem if file else "run"
    return Recipe(Path(file) if file else None, model, dspec, passes, evaluation,
                  output or f"runs/{stem}", seed, data, dict(lines or {}))


def load_recipe(path: str | Path, registry: Registry, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError naming file, line and field."""
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden: dict[tuple, str] = {}
    if overrides and not isinstance(data, dict):
        raise RecipeError("cannot apply --set to a recipe that is not a mapping.", file=str(path))
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value, text)
        overridden[parts] = text
    return validate_recipe(data, registry, file=str(path), lines=lines, overridden=overridden)


def recipe_json_schema(registry: Registry) -> dict:
    """JSON schema of recipes with the passes and dataset sources registered now."""
    pass_items = [{"type": "object", "additionalProperties": False, "required": [name],
                   "properties": {name: {"anyOf": [cls.Params.model_json_schema(), {"type": "null"}],
                                         "description": cls.summary()}}}
                  for name, cls in sorted(registry.passes.items())]
    data_items = []
    for name, cls in sorted(registry.datasets.items()):
        schema = cls.Params.model_json_schema()
        props = dict(schema.get("properties", {}))
        props[name] = props.pop(cls.task_field)
        data_items.append({"type": "object", "required": [name], "additionalProperties": False,
                           "properties": props, "description": cls.summary()})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mmprune recipe",
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "data", "passes"],
        "properties": {
            "model": ModelSpec.model_json_schema(),
            "data": {"anyOf": data_items},
            "passes": {"type": "array", "minItems": 1, "items": {"anyOf": pass_items}},
            "evaluation": EvaluationSpec.model_json_schema(),
            "output": {"type": "string", "description": "Run directory (default runs/<recipe name>)."},
            "seed": {"type": "integer", "default": 0, "description": "Seed of every random choice."},
        },
    }
