"""SteerLM attribute strings: one format shared by the attribute model, attribute-conditioned SFT and ``generate``.

SteerLM (Dong et al. 2023, as NeMo-Aligner trains it) conditions a model on an attribute string such as
``quality:4,toxicity:0,humor:0,helpfulness:4`` placed between the prompt and the response. Here the string lists
the format's attribute names in their fixed order as ``name:value`` joined by commas, every name present, every
value an integer in the format's range, and the prompt the model sees is ``template`` filled with ``{prompt}``
(the prompt text, after ``sft.prompt_template``) and ``{attributes}`` (the string).

Fine-tuning with ``sft.attributes`` stores the format in the tokenizer's config (``tokenizer_config.json`` key
``lmforge_steerlm``), so every checkpoint, adapter and merged model of the run carries it, as it carries the chat
template; ``lmforge generate --attributes`` reads it back from the model it opens, so training and inference build
the same prompt (:func:`format_of`); so does ``lmforge serve`` with a request's ``"attributes"`` (:func:`requested_values`
checks ``generate``'s and the server's values alike). A chat conversation gets the template's text after ``{prompt}`` (the
attribute line) after the generation prompt of every assistant turn, history included
(:meth:`AttributeFormat.condition_chat`), as NeMo-Aligner's SteerLM conversations put a label before every
assistant turn.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from lmforge.errors import DataError, UserError

#: The attributes of NeMo-Aligner's SteerLM recipe (Open Assistant's four, then HelpSteer's five), each 0-4.
DEFAULT_ATTRIBUTES = ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
                     "complexity", "verbosity")
DEFAULT_RANGE = (0, 4)
DEFAULT_TEMPLATE = "{prompt}\nattributes: {attributes}\n"
#: The tokenizer-config key the format is stored under.
TOKENIZER_KEY = "lmforge_steerlm"


def problems_of(names, value_range, template: Optional[str], where: str) -> list[str]:
    """What is wrong with a format's settings (``where``: the config prefix, e.g. ``sft.``), one line each."""
    out = []
    if not isinstance(names, (list, tuple)) or not names:
        return [f"{where}attributes must be a non-empty list of attribute names, e.g. [quality, helpfulness]"]
    for n in names:
        if not isinstance(n, str) or not n or not all(c.isalnum() or c == "_" for c in n):
            out.append(f"{where}attributes: {n!r} is not a valid attribute name (letters, digits and _ only)")
    if len(set(names)) != len(names):
        out.append(f"{where}attributes names an attribute twice: {list(names)}")
    if (not isinstance(value_range, (list, tuple)) or len(value_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value_range)
            or value_range[0] >= value_range[1]):
        out.append(f"{where}attribute_range={value_range!r} must be two integers [low, high] with low < high, "
                   f"e.g. [0, 4]")
    if template is not None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            return out + [f"{where}attribute_template={template!r} is not a valid template: {e}"]
        if sorted(fields) != ["attributes", "prompt"]:
            out.append(f"{where}attribute_template={template!r} must hold {{prompt}} and {{attributes}} once each "
                       f"and nothing else in braces (write {{{{ and }}}} for literal braces)")
    return out


@dataclass(frozen=True)
class AttributeFormat:
    """Attribute names in their fixed order, their shared integer range and the prompt template."""

    names: tuple
    low: int = DEFAULT_RANGE[0]
    high: int = DEFAULT_RANGE[1]
    template: str = DEFAULT_TEMPLATE

    @classmethod
    def of(cls, names: Sequence[str], value_range: Sequence[int] = DEFAULT_RANGE,
           template: str = DEFAULT_TEMPLATE) -> "AttributeFormat":
        return cls(tuple(names), int(value_range[0]), int(value_range[1]), template)

    def to_dict(self) -> dict:
        return {"attributes": list(self.names), "range": [self.low, self.high], "template": self.template}

    @classmethod
    def from_dict(cls, doc: Mapping, where: str) -> "AttributeFormat":
        names, value_range, template = doc.get("attributes"), doc.get("range"), doc.get("template")
        problems = problems_of(names, value_range, template if isinstance(template, str) else "", "")
        if problems:
            raise UserError(f"{where}: the stored SteerLM format is not valid: {problems[0]}")
        return cls.of(names, value_range, template)

    # -- values ---------------------------------------------------------------------------------------
    def check_value(self, name: str, value, where: str, error=DataError):
        """``value`` as an int or float in range; ``error`` names ``where`` otherwise."""
        if name not in self.names:
            raise error(f"{where}: unknown attribute {name!r}; the attributes are {', '.join(self.names)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise error(f"{where}: attribute {name!r} must be a number in [{self.low}, {self.high}], not "
                        f"{value!r}")
        if not self.low <= value <= self.high:
            raise error(f"{where}: attribute {name}={value} is out of range; values lie in [{self.low}, {self.high}]")
        return value

    def values(self, given, where: str, error=DataError) -> dict:
        """The complete, checked ``{name: int}`` of ``given`` (a record's ``attributes`` object): every name of the
        format present, none unknown, each value an integer in range."""
        if not isinstance(given, dict):
            raise error(f"{where}: the attributes must be an object such as {{\"{self.names[0]}\": {self.high}}}, "
                        f"not {type(given).__name__}")
        out = {}
        for name, value in given.items():
            self.check_value(name, value, where, error)
            if isinstance(value, float) and not value.is_integer():
                raise error(f"{where}: attribute {name}={value} must be a whole number (label the data with "
                            f"`lmforge reward`, which rounds)")
            out[name] = int(value)
        missing = [n for n in self.names if n not in out]
        if missing:
            raise error(f"{where}: missing attribute value(s) for {', '.join(missing)}; every one of "
                        f"{', '.join(self.names)} needs a value")
        return {n: out[n] for n in self.names}

    def parse(self, text: str, where: str = "--attributes") -> dict:
        """``"quality=4,helpfulness=4"`` (``:`` works as well as ``=``) as checked values (:meth:`values`)."""
        given = {}
        for item in text.split(","):
            name, sep, value = item.replace(":", "=").partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise UserError(f"{where} {text!r}: write name=value pairs joined by commas, e.g. "
                                f"{self.names[0]}={self.high}")
            try:
                number = int(value)
            except ValueError:
                raise UserError(f"{where}: attribute {name}={value!r} must be a whole number in "
                                f"[{self.low}, {self.high}]") from None
            if name in given:
                raise UserError(f"{where}: attribute {name!r} is given twice")
            given[name] = number
        return self.values(given, where, error=UserError)

    def string(self, values: Mapping[str, int]) -> str:
        """The attribute string: ``name:value`` of every attribute in the format's order, joined by commas."""
        return ",".join(f"{n}:{int(values[n])}" for n in self.names)

    def prompt(self, prompt: str, values: Mapping[str, int]) -> str:
        """The conditioned prompt text: the template with the prompt and the attribute string."""
        return self.template.format(prompt=prompt, attributes=self.string(values))

    def condition_chat(self, text: str, spans: list, values: Mapping[str, int], where: str,
                       at_end: bool = False) -> tuple[str, list]:
        """A rendered conversation conditioned on ``values``: the template's text after ``{prompt}`` (the attribute
        line) inserted where each assistant turn starts (``spans``, from
        :func:`lmforge.data.prompts.assistant_spans`) and, ``at_end``, after the final generation prompt. Returns
        the text and the assistant spans moved along."""
        if not self.template.startswith("{prompt}"):
            raise DataError(f"{where}: chat conversations get the attribute string after each assistant turn's "
                            f"generation prompt, so the attribute template must start with {{prompt}}, not "
                            f"{self.template!r}")
        add = self.template.format(prompt="", attributes=self.string(values))
        points = [start for start, _ in spans] + ([len(text)] if at_end else [])
        pieces, last = [], 0
        for point in points:
            pieces += [text[last:point], add]
            last = point
        pieces.append(text[last:])
        moved = [(a + len(add) * (k + 1), b + len(add) * (k + 1)) for k, (a, b) in enumerate(spans)]
        return "".join(pieces), moved

    def label(self, prediction: Sequence[float]) -> dict:
        """Predicted values (one per name, in order) as labels: clipped to the range and rounded to the nearest
        integer (halves to even, as Python's ``round``), as SteerLM's labelling does."""
        return {n: int(round(min(float(self.high), max(float(self.low), float(v)))))
                for n, v in zip(self.names, prediction)}


def requested_values(fmt: Optional[AttributeFormat], given, where: str, model: str) -> dict:
    """The checked values a user steers with (``generate --attributes``, a served request's ``attributes``):
    ``given`` is the attribute text (``quality:4,verbosity:2``, or ``=`` for ``:``) or an object
    (``{"quality": 4, ...}``). UserError naming ``where`` for a model without a stored format (``model`` names it),
    an unknown attribute, a missing one or a value out of range."""
    if fmt is None:
        raise UserError(f"{where}: {model} was not fine-tuned with sft.attributes, so it has no SteerLM attribute "
                        f"format to fill (tokenizer config key {TOKENIZER_KEY!r}); remove {where}")
    if isinstance(given, str):
        return fmt.parse(given, where)
    return fmt.values(given, where, error=UserError)


def set_format(tokenizer, fmt: AttributeFormat) -> None:
    """Store ``fmt`` in ``tokenizer``'s config, so the checkpoints it is saved into carry it."""
    config = getattr(tokenizer, "config", None)
    if not isinstance(config, dict):
        from lmforge.errors import ConfigError

        raise ConfigError("sft.attributes needs a tokenizer that lmforge saves with its config (tokenizer.json, "
                          "SentencePiece, tiktoken); this model's transformers-only tokenizer cannot carry the format")
    config[TOKENIZER_KEY] = fmt.to_dict()


def format_of(tokenizer, where: str = "the model") -> Optional[AttributeFormat]:
    """The format stored in ``tokenizer``'s config, or None for a model not trained with ``sft.attributes``."""
    config = getattr(tokenizer, "config", None)
    doc = config.get(TOKENIZER_KEY) if isinstance(config, dict) else None
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: tokenizer config key {TOKENIZER_KEY!r} must be an object")
    return AttributeFormat.from_dict(doc, where)
