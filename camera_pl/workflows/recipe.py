"""Recipe files: a YAML workflow with a validated schema.

A recipe names the model, the data and an ordered list of steps::

    name: compress_recover
    model: {name: reference}
    data: {source: stdlib, block_size: 128, batch_size: 8}
    steps:
      - stats: {max_tokens: 20000}
      - evaluate: {label: dense}
      - prune: {ratio: 0.4, method: camera, allocation: layer}
      - recover: {steps: 100, lr: 0.001}
      - save: {}

An optional ``offload: {execution_device: auto, cache_device: cpu}`` section
(:class:`~camera_pl.offload.OffloadConfig`) keeps the model in host memory and runs the
``stats``, ``prune`` and ``quantize`` steps one decoder layer at a time on the execution
device (``auto``: the recipe's accelerator), for models larger than its memory.

Unknown keys and wrong types are errors naming the key, the file and the line. ``--set
key=value`` overrides use dotted paths (``data.batch_size=4``, ``steps.2.prune.ratio=0.6``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from camera_pl.config import ConfigError
from camera_pl.expert_compression import CompressedExpertsConfig
from camera_pl.lora import LoRAConfig
from camera_pl.odp import OdpConfig
from camera_pl.offload import OffloadConfig
from camera_pl.pruning.config import PruneConfig
from camera_pl.quant.config import QuantizeConfig
from camera_pl.stats.observation import HEAPR_MODES


class RecipeError(ValueError):
    """A recipe file or override is invalid; the message names the key and the line."""


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSpec:
    name: str = "reference"  # "reference", "tiny:<model_type>", a local directory or a hub name
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}.")


@dataclass
class DataSpec:
    source: str = "stdlib"  # "stdlib", a local file/directory (text or JSON lines), or "hf:<name>"
    hf_config: str | None = None
    text_column: str = "text"
    block_size: int = 128
    batch_size: int = 8
    max_documents: int | None = None
    calib_batches: int = 16
    eval_batches: int = 16
    train_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "batch_size", "calib_batches", "eval_batches", "max_documents", "train_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value!r}: must be a positive integer.")


class StepSpec:
    """Options of one recipe step; each subclass also declares what the step does to the run.

    The runner reads these class attributes (they are not options: they never appear in a
    recipe, ``to_dict`` or ``dataclasses.fields``):

    * ``changes_model``: the step changes the model's weights or structure. Statistics
      collected before it no longer describe the model, so the runner drops them after it.
    * ``checkpoint``: the runner writes a checkpoint (model and tokenizer) to
      ``checkpoints/after_step<N>`` after the step; a resumed run starts from the last one.
      Every model-changing step needs one, or a resumed run could not reproduce its change.
    * ``installs_hooks``: the step changes the model's behaviour through state that saved
      weights do not hold (forward hooks, attention/experts implementations), e.g. ``odp``.
      A resumed run replays such steps on the reloaded model, with the statistics they used.
      Such a step must not also change the model (a replay would apply the change twice).
    """

    changes_model: ClassVar[bool] = False
    checkpoint: ClassVar[bool] = False
    installs_hooks: ClassVar[bool] = False


def declares(*, changes_model: bool, checkpoint: bool, installs_hooks: bool):
    """Class decorator: what a step does to the run (see :class:`StepSpec`), set on the step class itself."""

    def mark(cls: type) -> type:
        cls.changes_model, cls.checkpoint, cls.installs_hooks = changes_model, checkpoint, installs_hooks
        return cls

    return mark


@declares(changes_model=False, checkpoint=False, installs_hooks=False)
@dataclass
class StatsStep(StepSpec):
    """``max_tokens`` calibration tokens; ``heapr_mode`` (``full``/``diag``/``auto``) adds the gradient pass the
    ``heapr`` score needs (see :func:`camera_pl.collect_stats`)."""

    max_tokens: int | None = 20000
    heapr_mode: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"stats.max_tokens={self.max_tokens!r}: must be a positive integer or null.")
        if self.heapr_mode is not None and self.heapr_mode not in HEAPR_MODES:
            raise ConfigError(f"stats.heapr_mode={self.heapr_mode!r}: must be one of {', '.join(HEAPR_MODES)} or null.")


@declares(changes_model=True, checkpoint=True, installs_hooks=False)
@dataclass(frozen=True)
class PruneStep(StepSpec, PruneConfig):
    """:class:`~camera_pl.PruneConfig`: the same options as ``camera_pl.prune``."""


@declares(changes_model=True, checkpoint=True, installs_hooks=False)
@dataclass(frozen=True)
class RecoverStep(StepSpec, LoRAConfig):
    """:class:`~camera_pl.LoRAConfig`: the same options as ``camera_pl.recover`` (``lr`` defaults to 1e-3)."""


@declares(changes_model=True, checkpoint=True, installs_hooks=False)
@dataclass
class FinetuneStep(StepSpec):
    epochs: int = 3
    steps_per_epoch: int = 50
    lr: float = 1e-4
    schedule: dict[int, float] = field(default_factory=dict)  # epoch -> pruning ratio (gradual pruning)
    method: str = "camera"
    allocation: str = "layer"


@declares(changes_model=True, checkpoint=True, installs_hooks=False)
@dataclass(frozen=True)
class QuantizeStep(StepSpec, QuantizeConfig):
    """:class:`~camera_pl.QuantizeConfig`: the same options as ``camera_pl.quantize``."""


@declares(changes_model=False, checkpoint=False, installs_hooks=False)
@dataclass
class EvaluateStep(StepSpec):
    """Test perplexity and the accuracies of lm-eval ``tasks`` (offline ones, or lm-eval's; see ``camera_pl.evaluate``)
    on their first ``examples`` items."""

    label: str = ""
    perplexity: bool = True
    tasks: list[str] = field(default_factory=lambda: ["next_line", "docstring_match"])
    examples: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 1:
            raise ConfigError(f"evaluate.examples={self.examples!r}: must be a positive integer.")
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"evaluate.tasks={self.tasks!r}: must be a list of task names, e.g. [next_line, arc_easy].")
        if self.tasks:
            from camera_pl.eval.harness import require_lm_eval

            try:
                require_lm_eval()
            except ImportError as err:
                raise ConfigError(f"evaluate.tasks={self.tasks!r}: {err} Or set tasks: [] for perplexity only.") from None


@declares(changes_model=False, checkpoint=False, installs_hooks=False)
@dataclass
class AnalyzeStep(StepSpec):
    top_fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])


@declares(changes_model=False, checkpoint=False, installs_hooks=False)
@dataclass
class SaveStep(StepSpec):
    subdir: str = "model"


@declares(changes_model=False, checkpoint=False, installs_hooks=True)
@dataclass(frozen=True)
class OdpStep(StepSpec, OdpConfig):
    """:class:`~camera_pl.OdpConfig`: the same options as ``camera_pl.apply_odp``."""


@declares(changes_model=True, checkpoint=True, installs_hooks=False)
@dataclass(frozen=True)
class CompressedExpertsStep(StepSpec, CompressedExpertsConfig):
    """:class:`~camera_pl.CompressedExpertsConfig` plus the finetune that follows (``steps`` batches at ``lr``)."""

    steps: int = 100
    lr: float = 1e-3

    def check(self) -> None:
        super().check()
        self._number("steps", 1, integer=True)
        self._number("lr", 0.0, low_open=True)


STEP_TYPES: dict[str, type[StepSpec]] = {
    "stats": StatsStep, "prune": PruneStep, "recover": RecoverStep, "finetune": FinetuneStep,
    "quantize": QuantizeStep, "evaluate": EvaluateStep, "analyze": AnalyzeStep, "save": SaveStep,
    "odp": OdpStep, "compressed_experts": CompressedExpertsStep,
}


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    steps: list[tuple[str, Any]]
    seed: int = 0
    accelerator: str = "auto"
    source: str = "<recipe>"
    offload: OffloadConfig | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "seed": self.seed, "accelerator": self.accelerator,
               "model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
               "steps": [{kind: _plain_data(dataclasses.asdict(step))} for kind, step in self.steps]}
        if self.offload is not None:
            out["offload"] = dataclasses.asdict(self.offload)
        return out


def _plain_data(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON hold."""
    if isinstance(value, dict):
        return {k: _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    return value


# ---- parsing with line numbers ---------------------------------------------------------------
def _plain(node: yaml.Node, lines: dict[int, int], path: tuple = ()) -> Any:
    """Python value of a YAML node; records each mapping key's / sequence item's line by id(path)."""
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            lines[hash(path + (key,))] = key_node.start_mark.line + 1
            out[key] = _plain(value_node, lines, path + (key,))
        return out
    if isinstance(node, yaml.SequenceNode):
        out_list = []
        for i, item in enumerate(node.value):
            lines[hash(path + (i,))] = item.start_mark.line + 1
            out_list.append(_plain(item, lines, path + (i,)))
        return out_list
    return yaml.safe_load(yaml.serialize(node))


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is tuple:  # YAML sequences
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v) for a, b in value.items())
    return isinstance(value, hint)


def _build(cls: type, data: Any, where: str, path: tuple, lines: dict[int, int], source: str) -> Any:
    def line(p: tuple) -> str:
        n = lines.get(hash(p))
        return f"{source}:{n}" if n else source

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{line(path)}: '{where}' must be a mapping of options, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"{line(path + (key,))}: unknown key '{key}' in '{where}'; "
                              f"valid keys: {', '.join(sorted(fields))}.")
        if not _type_ok(value, hints[key]):
            name = getattr(hints[key], "__name__", str(hints[key]))
            raise RecipeError(f"{line(path + (key,))}: '{where}.{key}' must be {name}, got {value!r}.")
    try:
        return cls(**data)
    except ConfigError as err:
        raise RecipeError(f"{line(path)}: '{where}': {err}") from None


def parse_recipe(data: dict, lines: dict[int, int] | None = None, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (see the module docstring)."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with name, model, data and steps.")
    allowed = {"name", "model", "data", "steps", "seed", "accelerator", "offload"}
    for key in data:
        if key not in allowed:
            n = lines.get(hash((key,)))
            raise RecipeError(f"{source}:{n}: unknown top-level key '{key}'; valid keys: {', '.join(sorted(allowed))}.")
    if "steps" not in data or not isinstance(data["steps"], list) or not data["steps"]:
        raise RecipeError(f"{source}: 'steps' must be a non-empty list of steps such as '- prune: {{ratio: 0.4}}'.")
    steps = []
    for i, entry in enumerate(data["steps"]):
        n = lines.get(hash(("steps", i)))
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{source}:{n}: each step is a one-key mapping like '- prune: {{ratio: 0.4}}'.")
        (kind, options), = entry.items()
        if kind not in STEP_TYPES:
            raise RecipeError(f"{source}:{n}: unknown step '{kind}'; valid steps: {', '.join(STEP_TYPES)}.")
        steps.append((kind, _build(STEP_TYPES[kind], options, kind, ("steps", i, kind), lines, source)))
    for key, hint in (("seed", int), ("accelerator", str), ("name", str)):
        if key in data and not _type_ok(data[key], hint):
            raise RecipeError(f"{source}:{lines.get(hash((key,)))}: '{key}' must be {hint.__name__}, got {data[key]!r}.")
    return Recipe(
        name=data.get("name", Path(source).stem),
        model=_build(ModelSpec, data.get("model"), "model", ("model",), lines, source),
        data=_build(DataSpec, data.get("data"), "data", ("data",), lines, source),
        steps=steps, seed=data.get("seed", 0), accelerator=data.get("accelerator", "auto"), source=source,
        offload=_build(OffloadConfig, data["offload"], "offload", ("offload",), lines, source) if "offload" in data
        else None,
    )


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to raw recipe data."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects key=value, got {assignment!r}.")
    key, raw = assignment.split("=", 1)
    parts = key.split(".")
    target: Any = data
    in_step = False
    for part in parts[:-1]:
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise RecipeError(f"--set {key}: '{part}' is not a valid index into a list of {len(target)}.")
            target, in_step = target[int(part)], True
            continue
        if in_step and isinstance(target, dict) and len(target) == 1 and part not in target:
            raise RecipeError(f"--set {key}: that step is '{next(iter(target))}', not '{part}'; check the step index.")
        in_step = False
        if isinstance(target, dict):
            target = target.setdefault(part, {})
        else:
            raise RecipeError(f"--set {key}: '{part}' holds the value {target!r}, which has no options.")
    if not isinstance(target, (dict, list)):
        raise RecipeError(f"--set {key}: '{parts[-2]}' holds the value {target!r}, which has no options.")
    last = parts[-1]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {key}: the value {raw!r} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if isinstance(target, list):
        raise RecipeError(f"--set {key}: cannot replace a whole step; set one of its options.")
    target[last] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"No recipe file at {path}.")
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    lines: dict[int, int] = {}
    data = _plain(node, lines) if node is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_recipe(data, lines, str(path))
