"""Load, override, validate and resolve a pretraining config.

    cfg = load_config("gpt3/126m", ["trainer.devices=4", "model.global_batch_size=256"])

Layers, later winning: schema defaults (:mod:`lmforge.config.schema`) <- a recipe, YAML file or
dict <- ``a.b.c=value`` overrides as a shell passes them. Every mistake becomes one
:class:`~lmforge.errors.ConfigError` that names the key, where it came from (file and line, or
the command line) and what would work; all range problems are collected and raised together.
Derived values (gradient accumulation, scheduler length, sequence lengths) are filled in.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import Container, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from lmforge.config.batch import BatchPlan, data_parallel_size, resolve_batch
from lmforge.config.schema import (
    ACCELERATORS,
    ANY,
    CHECKPOINT_GRANULARITIES,
    CHECKPOINT_METHODS,
    CHECKPOINT_MODES,
    DATA_IMPLS,
    DATALOADER_TYPES,
    FSDP_REDUCE_DTYPES,
    NEMO_FIXED,
    NEMO_FIXED_HINTS,
    NEMO_IGNORED,
    OPTIMIZER_ALIASES,
    OPTIMIZERS,
    SCHEDULERS,
    ModelSection,
    PretrainConfig,
    max_time_seconds,
    normalize_activation,
    normalize_precision,
    FP8_PRECISIONS,
    tokenizer_path,
)
from lmforge.errors import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.parallel.dims import FSDP_STRATEGIES, ParallelDims, fsdp_strategy

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"


# ---------------------------------------------------------------------------------------------
# The schema as a tree of dotted keys
# ---------------------------------------------------------------------------------------------

def _schema_tree(cls: type) -> dict[str, Any]:
    """``{field: subtree}`` for nested dataclasses, ``{field: type}`` for leaves."""
    hints = get_type_hints(cls)
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        tree[f.name] = _schema_tree(tp) if dataclasses.is_dataclass(tp) else tp
    return tree


def _flatten_tree(tree: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    leaves: dict[str, Any] = {}
    groups: list[str] = []
    for name, sub in tree.items():
        key = prefix + name
        if isinstance(sub, dict):
            groups.append(key)
            sub_leaves, sub_groups = _flatten_tree(sub, key + ".")
            leaves.update(sub_leaves)
            groups.extend(sub_groups)
        else:
            leaves[key] = sub
    return leaves, groups


_TREE = _schema_tree(PretrainConfig)
_LEAVES, _GROUPS = _flatten_tree(_TREE)
_TOP_IGNORED = {"run", "hydra", "defaults"}
_SCHEMA_KEYS = sorted(set(_LEAVES) | set(_GROUPS))
_NEMO_KEYS = sorted((set(NEMO_IGNORED) - _TOP_IGNORED) | set(NEMO_FIXED))
# Names people reach for that difflib would not find.
_HINTS = {
    "trainer.gpus": "trainer.devices",
    "trainer.num_gpus": "trainer.devices",
    "trainer.nodes": "trainer.num_nodes",
    "model.tokenizer.path": "model.tokenizer.model",
    "model.tokenizer.tokenizer_model": "model.tokenizer.model",
    "model.data.data_path": "model.data.data_prefix",
    "model.seq_length": "model.encoder_seq_length",
}


def _describe(tp: Any) -> str:
    """A type annotation in words, for error messages."""
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if get_origin(tp) is list:
        args = get_args(tp)
        return "a list of numbers, e.g. [0.9,0.95]" if args == (float,) else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a value")


def _suggest(key: str) -> Optional[str]:
    """The valid dotted key the user most likely meant (lmforge's own keys before NeMo-only ones)."""
    if key in _HINTS:
        return _HINTS[key]
    leaf = key.rsplit(".", 1)[-1]
    for keys in (_SCHEMA_KEYS, _NEMO_KEYS):
        same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
        if same_leaf:  # the right name in the wrong group: pick the group that looks most alike
            return max(same_leaf, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
    for keys in (_SCHEMA_KEYS, _NEMO_KEYS):
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        if close:
            return close[0]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = {k.rsplit(".", 1)[-1]: k for k in _SCHEMA_KEYS if (k.rsplit(".", 1)[0] if "." in k else "") == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
    return siblings[close[0]] if close else None


# ---------------------------------------------------------------------------------------------
# Where a value came from
# ---------------------------------------------------------------------------------------------

@dataclass
class _Source:
    name: str  # file path, "recipe gpt3/126m (path)", "config dict" or "command line"
    lines: dict[str, int] = field(default_factory=dict)  # dotted key -> line (YAML files)
    override: Optional[str] = None  # the override as written, for command-line values

    def where(self, key: str = "") -> str:
        if self.override is not None:
            return f"command line: {self.override!r}"
        line = self.lines.get(re.sub(r"\[\d+\]", "", key))
        return f"{self.name}, line {line}" if line else self.name


@dataclass
class _Report:
    """NeMo-only keys seen while loading: ignored ones (for the warning) and fixed ones (checked)."""

    ignored: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, tuple[Any, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_ignored(self, key: str, value: Any) -> None:
        for leaf, leaf_value in _flatten_value(key, value):
            default = _ignored_default(leaf)
            if default is ANY or _is_interpolation(leaf_value) or leaf_value == default:
                self.ignored.pop(leaf, None)
            else:
                self.ignored[leaf] = leaf_value

    def problems(self) -> list[str]:
        out = []
        for key, (value, where) in self.fixed.items():
            if _is_interpolation(value) or value == NEMO_FIXED[key]:
                continue
            hint = f"; {NEMO_FIXED_HINTS[key]}" if key in NEMO_FIXED_HINTS else ""
            out.append(f"{key}={_show(value)} ({where}): lmforge supports only NeMo's default "
                       f"{_show(NEMO_FIXED[key])} for this key{hint}")
        return out

    def warnings(self) -> list[str]:
        lines = []
        if self.ignored:
            settings = ", ".join(f"{k}={_show(v)}" for k, v in self.ignored.items())
            lines.append(f"lmforge ignores these NeMo settings (no effect here): {settings}")
        return lines + self.notes


_MISSING = object()


def _ignored_default(key: str) -> Any:
    """NeMo's default for an ignored key; ANY under an ANY group; _MISSING if not ignored."""
    if key in NEMO_IGNORED:
        return NEMO_IGNORED[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if NEMO_IGNORED.get(".".join(parts[:i]), _MISSING) is ANY:
            return ANY
    return _MISSING


def _flatten_value(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        out = []
        for k, v in value.items():
            out.extend(_flatten_value(f"{key}.{k}", v))
        return out
    return [(key, value)]


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Reading YAML and overrides
# ---------------------------------------------------------------------------------------------

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``), as NeMo configs write it, and
    reads YAML 1.1's base-60 numbers as text, as YAML 1.2 does (``1:30`` is not 90; ``00:03:50:00`` is a
    trainer.max_time, not 13800)."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and ":" in value and tag in (_INT_TAG, _FLOAT_TAG):
            return _STR_TAG
        return tag


_INT_TAG, _FLOAT_TAG, _STR_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:str"


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _node_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            _node_lines(value_node, key + ".", lines)


def _read_yaml(path: Path, label: Optional[str] = None) -> tuple[dict, _Source]:
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=_YamlLoader)
        data = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{label}{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of keys (name, trainer, exp_manager, model), "
                          f"found {type(data).__name__}")
    lines: dict[str, int] = {}
    if node is not None:
        _node_lines(node, "", lines)
    return data, _Source(label, lines)


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
_OVERRIDE_FORM = ("expected KEY=VALUE with a dotted key, e.g. trainer.devices=4, model.optim.betas=[0.9,0.95] "
                  "or model.tokenizer.model=null")


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def _unquote(text: str) -> str:
    """Strip one level of matching single or double quotes."""
    return text[1:-1] if _is_quoted(text) else text


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def decode_escapes(text: str) -> str:
    r"""``\n``, ``\t``, ``\r``, ``\\`` and escaped quotes as the characters they stand for; any other backslash
    stays as typed (``sft.prompt_template='Q: {input}\nA: '`` on a shell command line means a newline)."""
    return re.sub(r"\\([ntr\\\"'])", lambda m: _ESCAPES[m.group(1)], text)


def parse_override(text: str, string_keys: Container[str] = ()) -> tuple[str, Any]:
    """Split ``a.b.c=value`` into the dotted key and the value parsed as YAML.

    One level of matching quotes around the whole argument or around the value is stripped (the
    shell may or may not have removed them); ``null`` is None; ``[0.9,0.95]`` is a list. Hydra's
    ``+key=value`` form is accepted as ``key=value``.

    A value that is text means what the user typed: its spaces are kept (also leading and trailing ones),
    escapes (``\n``, ``\t``, ...) are decoded, and text that YAML would read as a block mapping
    (``Q: {input}`` and a newline) or cannot read stays text. For keys in ``string_keys`` (fields typed str)
    any value but ``null`` is the text as typed (``{input}`` stays ``"{input}"``, not a mapping).
    """
    if not isinstance(text, str):
        raise ConfigError(f"malformed override {text!r}: {_OVERRIDE_FORM}")
    stripped = text.strip()
    raw = _unquote(stripped) if _is_quoted(stripped) else text.lstrip()  # the value's trailing spaces count
    if raw.startswith("~"):
        raise ConfigError(f"override {text!r}: removing keys is not supported; set the key to a value instead "
                          "(e.g. KEY=null)")
    raw = raw.lstrip("+")
    if "=" not in raw:
        raise ConfigError(f"malformed override {text!r}: {_OVERRIDE_FORM}")
    key, value = raw.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(f"malformed override {text!r}: {key!r} is not a dotted key; {_OVERRIDE_FORM}")
    inner = _unquote(value.strip()) if _is_quoted(value.strip()) else value  # as typed, spaces included
    body = inner.strip()
    if not body:
        return key, None
    try:
        parsed = yaml.load(body, Loader=_YamlLoader)
    except yaml.YAMLError:
        return key, decode_escapes(inner)
    as_text = ((isinstance(parsed, str) and not _is_quoted(body))
               or (isinstance(parsed, dict) and not body.startswith("{"))
               or (key in string_keys and parsed is not None and not isinstance(parsed, str)))
    return key, decode_escapes(inner) if as_text else parsed


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# ---------------------------------------------------------------------------------------------
# Checking keys and merging layers
# ---------------------------------------------------------------------------------------------

def _check_keys(data: Mapping, source: _Source, report: _Report) -> dict:
    """Return ``data`` without NeMo-only keys; raise ConfigError naming every unknown key."""
    unknown: list[str] = []
    cleaned = _walk(data, _TREE, "", source, report, unknown)
    if unknown:
        lines = []
        for key in unknown:
            hint = _suggest(key)
            lines.append(f"unknown config key {key!r} ({source.where(key)})"
                         + (f": did you mean {hint!r}?" if hint else ""))
        raise ConfigError("\n".join(lines))
    return cleaned


def _walk(data: Mapping, tree: dict[str, Any], prefix: str, source: _Source, report: _Report,
          unknown: list[str]) -> dict:
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = prefix + key
        if key in tree:
            sub = tree[key]
            if isinstance(sub, dict):
                if value is None:
                    continue  # an empty group in YAML ("optim:" with nothing under it)
                if not isinstance(value, Mapping):
                    example = next(iter(sub))
                    raise ConfigError(f"{dotted}={_show(value)} ({source.where(dotted)}): {dotted} is a group of "
                                      f"settings, not a value; set the keys inside it, e.g. {dotted}.{example}=...")
                out[key] = _walk(value, sub, dotted + ".", source, report, unknown)
            else:
                if isinstance(value, Mapping):
                    raise ConfigError(f"{dotted} ({source.where(dotted)}): expected {_describe(sub)}, "
                                      f"not a mapping of keys")
                out[key] = value
        elif dotted in NEMO_FIXED:
            report.fixed[dotted] = (value, source.where(dotted))
        elif _ignored_default(dotted) is not _MISSING:
            report.add_ignored(dotted, value)
        else:
            unknown.append(dotted)
    return out


def _omegaconf_error(e: OmegaConfBaseException, source: Optional[_Source]) -> ConfigError:
    key = e.full_key or ""
    base_key = re.sub(r"\[\d+\]$", "", key)
    where = f" ({source.where(base_key)})" if source is not None else ""
    msg = (e.msg or str(e)).splitlines()[0] if (e.msg or str(e)) else type(e).__name__
    if isinstance(e, ValidationError) and base_key in _LEAVES:
        value = e.value
        if isinstance(value, Node):
            value = value._value()
        if isinstance(value, Container):
            value = OmegaConf.to_container(value)
        return ConfigError(f"{key}={_show(value)}{where}: expected {_describe(_LEAVES[base_key])}")
    if "interpolation" in type(e).__name__.lower() or "interpolation" in msg.lower():
        return ConfigError(f"{key or 'config'}{where}: cannot resolve the interpolation: {msg}")
    return ConfigError(f"{key or 'config'}{where}: {msg}")


def _merge(base: Any, data: dict, source: _Source) -> Any:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, source) from None


def _register_resolvers() -> None:
    """NeMo's resolvers, which its configs and Launcher stage files use: ``${multiply:4, ${.hidden_size}}``,
    ``nodes: ${divide_ceil:${evaluation.model.model_parallel_size}, 4}``, ``${divide_floor:...}``."""
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in (("multiply", _multiply), ("divide_ceil", _divide_ceil), ("divide_floor", _divide_floor)):
        if not OmegaConf.has_resolver(name):
            register(name, fn)


def _multiply(x, y):
    return x * y


def _divide_ceil(x, y):
    return -(-int(x) // int(y))


def _divide_floor(x, y):
    return int(x) // int(y)


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

def _size_key(size: str) -> tuple[float, str]:
    match = re.fullmatch(r"([0-9.]+)([mb])", size.lower())
    if not match:
        return (float("inf"), size)
    return (float(match.group(1)) * (1e6 if match.group(2) == "m" else 1e9), size)


def list_recipes() -> list[str]:
    """Names of the built-in recipes (``family/size``), e.g. ``gpt3/126m``, ``llama3.2/1b``, ``tiny/llama``."""
    paths = RECIPES_DIR.glob("*/*.yaml")
    return sorted((f"{p.parent.name}/{p.stem}" for p in paths),
                  key=lambda n: (n.split("/")[0], _size_key(n.split("/")[1])))


def recipe_path(name: str) -> Path:
    """Path of the recipe ``name``; an unknown name raises ConfigError listing the known ones."""
    known = list_recipes()
    clean = name[:-5] if name.endswith(".yaml") else name
    if clean in known:
        return RECIPES_DIR / f"{clean}.yaml"
    close = difflib.get_close_matches(clean, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown recipe {name!r} (and no such YAML file): {hint}known recipes: {', '.join(known)}")


def _load_source(source: Any, source_name: Optional[str]) -> tuple[dict, _Source]:
    if isinstance(source, Mapping):
        return dict(source), _Source(source_name or "config dict")
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return to_dict(source), _Source(source_name or "config object")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.is_file():
            return _read_yaml(path, source_name)
        if path.suffix in (".yaml", ".yml") and text[:-len(path.suffix)] not in list_recipes():
            raise ConfigError(f"config file {text} not found")
        recipe = recipe_path(text)
        return _read_yaml(recipe, source_name or f"recipe {text} ({recipe})")
    raise ConfigError(f"config source {source!r}: expected a recipe name, a YAML path or a dict")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_config(source: Union[str, os.PathLike, Mapping], overrides: Sequence[str] = (),
                source_name: Optional[str] = None) -> PretrainConfig:
    """Load a pretraining config: schema defaults <- recipe / YAML / dict <- dotted overrides.

    Args:
        source: a recipe name (``gpt3/126m``, ``llama3.2/1b``, ``tiny/llama``; see :func:`list_recipes`),
            a YAML file path, or a dict with the same nesting.
        overrides: ``a.b.c=value`` strings as a shell passes them, e.g. ``trainer.devices=4``,
            ``model.optim.betas=[0.9,0.95]``, ``model.tokenizer.model=null``.
        source_name: how to name a dict source in error messages (e.g. the checkpoint it came from).

    Returns:
        A validated :class:`PretrainConfig` with derived values filled in:
        ``trainer.accumulate_grad_batches`` (or whichever batch number was left null),
        ``model.max_position_embeddings`` and ``model.data.seq_length`` (default: encoder_seq_length),
        ``model.optim.sched.max_steps`` (default: trainer.max_steps). Warnings (ignored NeMo keys)
        are logged and available from :func:`cfg_warnings`.

    Raises:
        ConfigError: unknown key (with "did you mean"), wrong type, malformed override, any value
            out of range (all such problems in one message), or impossible batch arithmetic.
    """
    _register_resolvers()
    report = _Report()
    data, source_info = _load_source(source, source_name)
    merged = OmegaConf.structured(PretrainConfig)
    merged = _merge(merged, _check_keys(data, source_info, report), source_info)
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        key, value = parse_override(text)
        override_info = _Source("command line", override=text)
        merged = _merge(merged, _check_keys(_nest(key, value), override_info, report), override_info)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, source_info if not overrides else None) from None

    report.notes.extend(_normalize(cfg))
    _fill_derived(cfg)
    problems = report.problems() + _problems(cfg)
    if problems:
        raise ConfigError(_join_problems(problems))
    plan = batch_plan(cfg)
    pp = cfg.model.pipeline_model_parallel_size
    if pp > plan.accumulate_grad_batches:  # the 1F1B schedules run a step's micro batches through the stages
        raise ConfigError(f"model.pipeline_model_parallel_size={pp} needs at least {pp} micro batches a step to fill "
                          f"its stages, but model.global_batch_size={plan.global_batch_size} / (model.micro_batch_size="
                          f"{plan.micro_batch_size} x data parallel {plan.data_parallel_size}) = "
                          f"{plan.accumulate_grad_batches}: raise model.global_batch_size or lower "
                          f"model.micro_batch_size")
    cfg.model.global_batch_size = plan.global_batch_size
    cfg.model.micro_batch_size = plan.micro_batch_size
    cfg.trainer.accumulate_grad_batches = plan.accumulate_grad_batches
    cfg._warnings = report.warnings()
    for line in cfg._warnings:
        log.warning(line)
    return cfg


def cfg_warnings(cfg: PretrainConfig) -> list[str]:
    """Warnings from :func:`load_config` (e.g. the NeMo keys it ignored), one line each."""
    return list(getattr(cfg, "_warnings", []))


def _normalize(cfg: PretrainConfig) -> list[str]:
    """Canonical spellings (precision, accelerator, activation, optimizer); returns notes for the user."""
    notes = []
    if str(cfg.trainer.precision).strip().lower() in FP8_PRECISIONS:  # NeMo 2 / Lightning spelling of FP8 training
        cfg.trainer.precision, cfg.model.fp8 = "bf16-mixed", True
    try:
        cfg.trainer.precision = normalize_precision(cfg.trainer.precision)
    except ConfigError:
        pass  # reported by _problems
    accelerator = str(cfg.trainer.accelerator).lower()
    cfg.trainer.accelerator = "gpu" if accelerator == "cuda" else accelerator
    cfg.model.activation = normalize_activation(cfg.model.activation)
    if cfg.model.optim.name in OPTIMIZER_ALIASES:
        new = OPTIMIZER_ALIASES[cfg.model.optim.name]
        if not cfg.model.fsdp:
            cfg.model.fsdp, cfg.model.fsdp_sharding_strategy = True, "grad"
            notes.append(f"model.optim.name={cfg.model.optim.name} shards the optimizer state: lmforge runs it as "
                         f"{new} under FSDP with model.fsdp_sharding_strategy=grad (gradients and optimizer state "
                         "sharded over the data-parallel ranks)")
        cfg.model.optim.name = new
    t, m = cfg.trainer, cfg.model
    if (t.accumulate_grad_batches == 1 and _is_int(m.global_batch_size) and _is_int(m.micro_batch_size)
            and m.global_batch_size != m.micro_batch_size * _planned_dp(cfg)):
        # NeMo's meaning: Megatron models derive accumulation from the batch sizes; its configs keep
        # trainer.accumulate_grad_batches=1 ("do not modify") whatever the accumulation is.
        t.accumulate_grad_batches = None
        notes.append("trainer.accumulate_grad_batches=1 is NeMo's fixed value: as in NeMo, gradient accumulation is "
                      "derived from model.global_batch_size / (model.micro_batch_size x data-parallel size)")
    return notes


def _planned_dp(cfg: PretrainConfig) -> int:
    """The data-parallel size the config plans, or 0 when its sizes are not valid yet (reported elsewhere)."""
    try:
        return parallel_dims(cfg).dp
    except (ConfigError, TypeError, ValueError):
        return 0


def _fill_derived(cfg: PretrainConfig) -> None:
    m = cfg.model
    if not cfg.exp_manager.exp_dir:
        cfg.exp_manager.exp_dir = "results"  # NeMo configs write exp_dir: null
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.encoder_seq_length
    if m.data.seq_length is None:
        m.data.seq_length = m.encoder_seq_length
    if m.optim.sched.max_steps is None and isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps > 0:
        m.optim.sched.max_steps = cfg.trainer.max_steps


def parallel_dims(cfg: PretrainConfig, rank: int = 0) -> ParallelDims:
    """The run's :class:`~lmforge.parallel.dims.ParallelDims`: the one source of the data-parallel size."""
    t, m = cfg.trainer, cfg.model
    data_parallel_size(t.devices, t.num_nodes, m.tensor_model_parallel_size, m.pipeline_model_parallel_size)
    return ParallelDims(world_size=t.devices * t.num_nodes, rank=rank, tp=m.tensor_model_parallel_size,
                        pp=m.pipeline_model_parallel_size, fsdp=fsdp_strategy(m.fsdp, m.fsdp_sharding_strategy),
                        devices_per_node=t.devices, cp=m.context_parallel_size,
                        ep=m.expert_model_parallel_size)


def batch_plan(cfg: PretrainConfig) -> BatchPlan:
    """The :class:`BatchPlan` of ``cfg`` (see :func:`lmforge.config.batch.resolve_batch`)."""
    return resolve_batch(cfg.model.global_batch_size, cfg.model.micro_batch_size,
                         cfg.trainer.accumulate_grad_batches, dims=parallel_dims(cfg))


def _join_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(problems: list[str], key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        problems.append(f"{key}={_show(value)} is not one of: {shown}")


def _at_least(problems: list[str], key: str, value: Any, minimum: int, optional: bool = False) -> bool:
    if value is None and optional:
        return True
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        problems.append(f"{key}={_show(value)} must be {what}" + (" or null" if optional else ""))
        return False
    return True


def _check_splits(problems: list[str], value: Any) -> None:
    parts = [p.strip() for p in str(value).replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        problems.append(f"model.data.splits_string={_show(value)} must be up to three non-negative "
                        "train,validation,test weights, e.g. '980,10,10'")


def _check_data_prefix(problems: list[str], value: Any) -> None:
    form = "a path prefix or a list [weight1, prefix1, weight2, prefix2, ...]"
    if value is None or (isinstance(value, str) and value):
        return
    if not isinstance(value, list) or not value:
        problems.append(f"model.data.data_prefix={_show(value)} must be {form}")
        return
    if len(value) == 1 and isinstance(value[0], str):
        return
    pairs_ok = len(value) % 2 == 0 and all(
        _is_number(w) and w > 0 and isinstance(p, str) and p for w, p in zip(value[0::2], value[1::2]))
    if not pairs_ok:
        problems.append(f"model.data.data_prefix={value} must be {form} with positive weights")


def _position_problems(m: ModelSection, d) -> list[str]:
    """The training sequence must fit the model's positions: a hard limit for every position type here (the
    learned table, the rotary tables and ALiBi's bound all hold ``max_position_embeddings`` positions)."""
    max_pos = m.max_position_embeddings or m.encoder_seq_length
    key, seq = ("model.data.seq_length", d.seq_length) if d.seq_length else ("model.encoder_seq_length",
                                                                              m.encoder_seq_length)
    if seq <= max_pos:
        return []
    limit = {"learned_absolute": f"the model's learned position table has {max_pos} rows",
             "rope": f"the model's rotary tables hold {max_pos} positions"}.get(
        m.position_embedding_type, f"the model accepts at most {max_pos} positions")
    given = (f"model.max_position_embeddings={max_pos}" if m.max_position_embeddings
             else f"model.max_position_embeddings (unset: model.encoder_seq_length={max_pos})")
    return [f"{key}={seq} exceeds {given}, a hard limit ({limit}; position_embedding_type="
            f"{m.position_embedding_type}); raise model.max_position_embeddings to at least {seq}, or lower {key}"]


def _check_activation_checkpointing(problems: list[str], m: ModelSection) -> None:
    """NeMo's rules for ``model.activations_checkpoint_*`` (granularity and method choices are checked apart), those
    of its Megatron-core models: ``selective`` takes a method (and ignores it), not a number of layers."""
    g, method, n = m.activations_checkpoint_granularity, m.activations_checkpoint_method, \
        m.activations_checkpoint_num_layers
    n_ok = n is None or (_is_int(n) and n >= 1)
    if not n_ok:
        problems.append(f"model.activations_checkpoint_num_layers={_show(n)} must be a positive integer "
                        "(null: 1), e.g. 1")
    if g is None:
        for key, value in (("method", method), ("num_layers", n)):
            if value is not None:
                problems.append(f"model.activations_checkpoint_{key}={value} has no effect without "
                                "model.activations_checkpoint_granularity; set it to full")
    elif g == "selective":  # as Megatron-core: the core attention of every layer, no chunks; a method is ignored
        if n is not None:
            problems.append(f"model.activations_checkpoint_num_layers={n} must be null with "
                            "model.activations_checkpoint_granularity=selective; set it to null, or use "
                            "model.activations_checkpoint_granularity=full")
    elif g == "full" and method == "block" and n_ok and n is not None and _is_int(m.num_layers) and n > m.num_layers:
        problems.append(f"model.activations_checkpoint_num_layers={n} exceeds model.num_layers={m.num_layers} "
                        f"with model.activations_checkpoint_method=block; use at most {m.num_layers}")


def _problems(cfg: PretrainConfig) -> list[str]:
    """Every range or choice problem in ``cfg`` (empty when it is valid)."""
    p: list[str] = []
    t, e, m = cfg.trainer, cfg.exp_manager, cfg.model
    d, o = m.data, m.optim

    # trainer
    parallel_ok = _at_least(p, "trainer.devices", t.devices, 1)
    parallel_ok &= _at_least(p, "trainer.num_nodes", t.num_nodes, 1)
    _choice(p, "trainer.accelerator", t.accelerator, ACCELERATORS)
    for check, value in ((normalize_precision, t.precision), (max_time_seconds, t.max_time)):
        try:
            check(value)
        except ConfigError as err:
            p.append(str(err))
    if not _is_int(t.max_steps) or (t.max_steps < 1 and t.max_steps != -1):
        p.append(f"trainer.max_steps={_show(t.max_steps)} must be a positive number of steps "
                 "(or -1 with trainer.max_epochs set)")
    _at_least(p, "trainer.max_epochs", t.max_epochs, 1, optional=True)
    if (not _is_int(t.max_steps) or t.max_steps <= 0) and not t.max_epochs:
        p.append("neither trainer.max_steps nor trainer.max_epochs is set: set one, e.g. trainer.max_steps=1000")
    vci = t.val_check_interval
    if _is_int(vci):
        if vci < 1:
            p.append(f"trainer.val_check_interval={vci} must be a positive number of steps")
    elif isinstance(vci, float):
        if not 0.0 < vci <= 1.0:
            p.append(f"trainer.val_check_interval={vci} is a float, so a fraction of max_steps, and must be in "
                     f"(0, 1]; for a number of steps give an integer, e.g. {int(vci)}")
    else:
        p.append(f"trainer.val_check_interval={_show(vci)} must be an integer number of steps or a fraction in (0, 1]")
    for key in ("limit_val_batches", "limit_test_batches"):
        value = getattr(t, key)
        if not ((_is_int(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)):
            p.append(f"trainer.{key}={_show(value)} must be a number of batches (integer >= 0) "
                     "or a fraction in [0, 1]")
    _at_least(p, "trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if not t.gradient_clip_val >= 0:
        p.append(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0 (0 turns clipping off)")

    # exp_manager
    ckpt = e.checkpoint_callback_params
    _choice(p, "exp_manager.checkpoint_callback_params.mode", ckpt.mode, CHECKPOINT_MODES)
    _at_least(p, "exp_manager.checkpoint_callback_params.save_top_k", ckpt.save_top_k, -1)
    _at_least(p, "exp_manager.checkpoint_callback_params.every_n_train_steps", ckpt.every_n_train_steps, 1,
              optional=True)

    # model: parallelism, lengths
    parallel_ok &= _at_least(p, "model.tensor_model_parallel_size", m.tensor_model_parallel_size, 1)
    parallel_ok &= _at_least(p, "model.pipeline_model_parallel_size", m.pipeline_model_parallel_size, 1)
    parallel_ok &= _at_least(p, "model.context_parallel_size", m.context_parallel_size, 1)
    parallel_ok &= _at_least(p, "model.expert_model_parallel_size", m.expert_model_parallel_size, 1)
    batch_ok = _at_least(p, "model.micro_batch_size", m.micro_batch_size, 1, optional=True)
    batch_ok &= _at_least(p, "model.global_batch_size", m.global_batch_size, 1, optional=True)
    batch_ok &= _at_least(p, "trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1, optional=True)
    if parallel_ok and batch_ok:
        try:
            batch_plan(cfg)
        except ConfigError as err:
            p.append(str(err))
    lengths_ok = _at_least(p, "model.encoder_seq_length", m.encoder_seq_length, 1)
    lengths_ok &= _at_least(p, "model.max_position_embeddings", m.max_position_embeddings, 1, optional=True)
    lengths_ok &= _at_least(p, "model.data.seq_length", d.seq_length, 1, optional=True)
    if lengths_ok:
        p.extend(_position_problems(m, d))
    _at_least(p, "model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, 1)
    if m.sequence_parallel and _is_int(m.tensor_model_parallel_size) and m.tensor_model_parallel_size == 1:
        p.append("model.sequence_parallel=true splits the tensor-parallel group's sequence: set "
                 "model.tensor_model_parallel_size above 1, or model.sequence_parallel=false")
    if not isinstance(m.fsdp, bool):
        p.append(f"model.fsdp={_show(m.fsdp)} must be true or false")
    _choice(p, "model.fsdp_sharding_strategy", m.fsdp_sharding_strategy, tuple(FSDP_STRATEGIES))
    if str(m.fsdp_grad_reduce_dtype).lower() not in FSDP_REDUCE_DTYPES:
        p.append(f"model.fsdp_grad_reduce_dtype={_show(m.fsdp_grad_reduce_dtype)} is not one of: 32, bf16, 16")
    if not m.fsdp:  # NeMo's YAML spells out the defaults with fsdp: false; anything else would be ignored
        for key, default in (("fsdp_sharding_strategy", "full"), ("fsdp_grad_reduce_dtype", "32")):
            if str(getattr(m, key)).lower() != default:
                p.append(f"model.{key}={_show(getattr(m, key))} applies to FSDP runs only: set model.fsdp=true, or "
                         "remove the key")
    if m.fsdp_cpu_offload and not m.fsdp:
        p.append("model.fsdp_cpu_offload=true offloads FSDP shards: set model.fsdp=true too")
    if m.fsdp_sharded_checkpoint and not m.fsdp:  # false (NeMo's default) says what an unsharded run does anyway
        p.append(f"model.fsdp_sharded_checkpoint={_show(m.fsdp_sharded_checkpoint)} applies to FSDP runs only: set "
                 "model.fsdp=true, or remove the key")
    if (m.fsdp and m.fsdp_sharding_strategy == "hybrid" and _is_int(t.devices) and _is_int(t.num_nodes)
            and t.num_nodes == 1):
        p.append("model.fsdp_sharding_strategy=hybrid replicates across nodes but trainer.num_nodes=1: use "
                 "model.fsdp_sharding_strategy=full on one node")
    _choice(p, "model.activations_checkpoint_granularity", m.activations_checkpoint_granularity,
            (None,) + CHECKPOINT_GRANULARITIES)
    _choice(p, "model.activations_checkpoint_method", m.activations_checkpoint_method,
            (None,) + CHECKPOINT_METHODS)
    _check_activation_checkpointing(p, m)
    if (m.fsdp and m.activations_checkpoint_granularity == "full" and m.activations_checkpoint_method != "block"
            and _is_int(m.activations_checkpoint_num_layers) and m.activations_checkpoint_num_layers > 1):
        p.append(f"model.activations_checkpoint_num_layers={m.activations_checkpoint_num_layers} with method uniform "
                 "recomputes several blocks as one unit, but under model.fsdp=true each block gathers its own "
                 "parameters: use model.activations_checkpoint_num_layers=1 (every block), or "
                 "model.activations_checkpoint_method=block")

    # model: architecture, checked by ModelConfig itself (sizes, heads/groups, norms, dropouts, ...)
    if lengths_ok and _is_int(m.make_vocab_size_divisible_by) and m.make_vocab_size_divisible_by >= 1:
        try:
            arch = model_config_from(m, m.make_vocab_size_divisible_by)
        except ConfigError as err:
            arch = None
            text = str(err)
            prefix = "invalid model config:\n"
            if text.startswith(prefix):
                p.extend(line.strip() for line in text[len(prefix):].splitlines() if line.strip())
            else:
                p.append(text)
        from lmforge.train.fp8 import ALL_GATHER_SETTINGS, RECIPES  # the values the float8 code takes

        _choice(p, "model.fp8_recipe", m.fp8_recipe, RECIPES)
        _choice(p, "model.fp8_fsdp_all_gather", str(m.fp8_fsdp_all_gather).lower(), ALL_GATHER_SETTINGS)
        if str(m.fp8_fsdp_all_gather).lower() == "true" and not m.fp8:
            p.append("model.fp8_fsdp_all_gather=true gathers the float8 projections' weights, but model.fp8 is off: set "
                     "model.fp8=true (trainer.precision=fp8) or remove model.fp8_fsdp_all_gather")
        if m.loss_chunk_size is not None and (not _is_int(m.loss_chunk_size) or m.loss_chunk_size < 0):
            p.append(f"model.loss_chunk_size={_show(m.loss_chunk_size)} must be a number of tokens (e.g. 4096), 0 "
                     "(whole batch) or null (automatic)")
        if (_is_int(m.loss_chunk_size) and m.loss_chunk_size > 0
                and (m.tensor_model_parallel_size > 1 or m.pipeline_model_parallel_size > 1)):
            p.append(f"model.loss_chunk_size={m.loss_chunk_size} chunks the head + cross-entropy of one process, but "
                     "tensor and pipeline parallel runs compute the loss on their own (vocabulary-sharded logits, the "
                     "last stage): remove it, or set it to null/0")
        if m.fp8 and (m.tensor_model_parallel_size > 1 or m.pipeline_model_parallel_size > 1):
            p.append("model.fp8=true (trainer.precision=fp8) with tensor or pipeline parallelism is not supported yet: "
                     "use FSDP/DDP, or trainer.precision=bf16-mixed")
        if m.fp8 and str(t.precision) != "bf16-mixed":
            p.append(f"model.fp8=true runs the block projections in float8 and the rest in bf16, but trainer.precision="
                     f"{t.precision}: use trainer.precision=bf16-mixed (or trainer.precision=fp8)")
        pp, vp = m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size
        if arch is not None and parallel_ok and (pp > 1 or vp is not None):
            p.extend(_pipeline_problems(arch, pp, vp, t.accumulate_grad_batches if _is_int(t.accumulate_grad_batches)
                                        else None))
            if pp > 1 and m.compile:
                p.append(f"model.compile=true with model.pipeline_model_parallel_size={pp} is not supported yet: "
                         "drop one of them")
        if arch is not None and parallel_ok and m.tensor_model_parallel_size > 1:
            from lmforge.parallel.tensor import tensor_parallel_problems

            p.extend(tensor_parallel_problems(arch, m.tensor_model_parallel_size))  # heads, groups, ffn, family
            if m.compile:  # compiled tensor-parallel blocks fail in backward (DTensor redistribute, torch 2.13)
                p.append(f"model.compile=true with model.tensor_model_parallel_size={m.tensor_model_parallel_size} is "
                         "not supported yet: drop one of them (FSDP compiles: model.fsdp=true model.compile=true)")
            if m.sequence_parallel and m.position_embedding_type == "learned_absolute":
                p.append("model.sequence_parallel=true with learned position embeddings (GPT) is not supported yet: "
                         "use model.sequence_parallel=false (tensor parallelism alone works)")

        if parallel_ok and m.context_parallel_size > 1:  # lmforge.parallel.context
            from lmforge.parallel.context import context_parallel_problems

            p.extend(context_parallel_problems(
                arch, m.context_parallel_size, d.seq_length or m.encoder_seq_length, tp=m.tensor_model_parallel_size,
                pp=m.pipeline_model_parallel_size, fsdp=m.fsdp_sharding_strategy if m.fsdp is True else None,
                compile=bool(m.compile)))
        ep = m.expert_model_parallel_size
        if arch is not None and parallel_ok and ep > 1:  # expert parallelism: experts divisible, and no compile yet
            from lmforge.parallel.expert import expert_parallel_problems

            p.extend(expert_parallel_problems(arch, ep))
            try:
                layout = parallel_dims(cfg).expert_parallel_problem()  # FSDP, tensor, pipeline: not yet
            except ConfigError:
                layout = None  # a layout that does not divide is reported above (the batch plan)
            p.extend([layout] if layout else [])
            if m.compile:
                p.append(f"model.compile=true with model.expert_model_parallel_size={ep} is not supported yet: drop one "
                         "of them")

    # model.data
    _check_data_prefix(p, d.data_prefix)
    _choice(p, "model.data.data_impl", d.data_impl, DATA_IMPLS)
    _check_splits(p, d.splits_string)
    _at_least(p, "model.data.num_workers", d.num_workers, 0)
    if d.dataloader_type == "cyclic":
        p.append("model.data.dataloader_type=cyclic (Megatron's random sampler, reshuffled every epoch) is not "
                 "supported: use single (the GPT dataset's samples are already shuffled, every epoch differently)")
    else:
        _choice(p, "model.data.dataloader_type", d.dataloader_type, DATALOADER_TYPES)
    document_flags = [f"model.data.{k}=true" for k in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask")
                      if getattr(d, k) is True]
    for size_key, size in (("model.pipeline_model_parallel_size", m.pipeline_model_parallel_size),
                           ("model.context_parallel_size", m.context_parallel_size)):
        if document_flags and _is_int(size) and size > 1:
            p.append(f"{', '.join(document_flags)} with {size_key}={size} is not supported yet (document masks and "
                     f"positions are not split across stages / context ranks): drop one of them")

    # model.optim
    _choice(p, "model.optim.name", o.name, OPTIMIZERS)
    if not o.lr > 0:
        p.append(f"model.optim.lr={o.lr} must be > 0")
    if not o.weight_decay >= 0:
        p.append(f"model.optim.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"model.optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9,0.95]")
    if not o.eps > 0:
        p.append(f"model.optim.eps={o.eps} must be > 0")
    s = o.sched
    _choice(p, "model.optim.sched.name", s.name, (None,) + SCHEDULERS)
    steps_ok = _at_least(p, "model.optim.sched.warmup_steps", s.warmup_steps, 0)
    steps_ok &= _at_least(p, "model.optim.sched.constant_steps", s.constant_steps, 0)
    steps_ok &= _at_least(p, "model.optim.sched.max_steps", s.max_steps, 1, optional=True)
    if not s.min_lr >= 0:
        p.append(f"model.optim.sched.min_lr={s.min_lr} must be >= 0")
    elif o.lr > 0 and s.min_lr > o.lr:
        p.append(f"model.optim.sched.min_lr={s.min_lr} exceeds model.optim.lr={o.lr}")
    if steps_ok and s.max_steps is not None and s.warmup_steps + s.constant_steps > s.max_steps:
        p.append(f"model.optim.sched.warmup_steps + constant_steps = {s.warmup_steps} + {s.constant_steps} = "
                 f"{s.warmup_steps + s.constant_steps} exceeds the schedule's max_steps={s.max_steps} "
                 "(model.optim.sched.max_steps, default trainer.max_steps)")
    return p


def _pipeline_problems(arch: ModelConfig, pp: int, virtual: Optional[int], accumulate: Optional[int]) -> list[str]:
    """Why ``arch`` cannot be split into ``pp x virtual`` pipeline stages (empty: it can)."""
    out = []
    if virtual is not None and (not _is_int(virtual) or virtual < 1):
        return [f"model.virtual_pipeline_model_parallel_size={_show(virtual)} must be a positive integer or null"]
    v = virtual or 1
    if v > 1 and pp == 1:
        out.append(f"model.virtual_pipeline_model_parallel_size={v} interleaves pipeline stages: set "
                   "model.pipeline_model_parallel_size above 1, or the virtual size to null")
    if arch.num_layers % (pp * v):
        out.append(f"model.num_layers={arch.num_layers} is not divisible by model.pipeline_model_parallel_size x "
                   f"virtual_pipeline_model_parallel_size = {pp} x {v} = {pp * v} stages")
    if pp > 1:
        for what, on in (("ALiBi", arch.position_embedding_type == "alibi"),
                         ("mixture-of-experts", arch.num_moe_experts is not None)):
            if on:
                out.append(f"pipeline parallelism for {what} models is not supported yet")
        if v > 1 and accumulate is not None and accumulate % pp:
            out.append(f"interleaved 1F1B needs the micro batches of a step (trainer.accumulate_grad_batches="
                       f"{accumulate}) to be a multiple of model.pipeline_model_parallel_size={pp}")
    return out


def validate(cfg: PretrainConfig) -> None:
    """Check every range and choice in ``cfg`` and the batch arithmetic; raise one ConfigError listing all problems."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError(_join_problems(problems))


# ---------------------------------------------------------------------------------------------
# From the config to other parts
# ---------------------------------------------------------------------------------------------

_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                     if f.name != "vocab_size" and f.name in {g.name for g in dataclasses.fields(ModelSection)})


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (NeMo's make_vocab_size_divisible_by)."""
    if not multiple or multiple <= 1:
        return vocab_size
    return -(-vocab_size // multiple) * multiple


def model_config_from(cfg: Union[PretrainConfig, ModelSection], vocab_size: int) -> ModelConfig:
    """The :class:`~lmforge.models.config.ModelConfig` of a run.

    Args:
        cfg: a :class:`PretrainConfig` or its ``model`` section.
        vocab_size: the tokenizer's vocabulary size; padded up to a multiple of
            ``model.make_vocab_size_divisible_by x model.tensor_model_parallel_size`` (as NeMo pads).

    Architecture fields map across by name; ``max_position_embeddings`` defaults to
    ``encoder_seq_length`` and NeMo's ``fast-swiglu`` becomes ``swiglu``.
    """
    m = cfg.model if isinstance(cfg, PretrainConfig) else cfg
    if not _is_int(vocab_size) or vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size!r} must be a positive integer (the tokenizer's vocabulary size)")
    values = {name: getattr(m, name) for name in _ARCH_FIELDS}
    values["activation"] = normalize_activation(m.activation)
    values["max_position_embeddings"] = m.max_position_embeddings or m.encoder_seq_length
    # NeMo/Megatron pad to a multiple of make_vocab_size_divisible_by x tensor_model_parallel_size, so every
    # tensor-parallel rank holds as many vocabulary rows
    tp = m.tensor_model_parallel_size if _is_int(m.tensor_model_parallel_size) and m.tensor_model_parallel_size > 0 else 1
    return ModelConfig(vocab_size=pad_vocab_size(vocab_size, m.make_vocab_size_divisible_by * tp), **values)


def to_dict(cfg: PretrainConfig) -> dict:
    """The config as plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


class _YamlDumper(yaml.SafeDumper):
    """Block style for mappings, flow style for lists (``betas: [0.9, 0.95]``)."""


_YamlDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


_YamlDumper.add_representer(  # a multi-line text (a prompt template) on one line, as "Q: {input}\nA: "
    str, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data,
                                                      style='"' if "\n" in data else None))


def to_yaml(cfg) -> str:
    """The config (PretrainConfig, or FinetuneConfig) as YAML text; :func:`load_config` (or
    ``load_finetune_config``) reads it back (derived values included)."""
    return yaml.dump(to_dict(cfg), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)
