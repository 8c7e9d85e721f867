"""The grammar of FunctionGemma calls to given tools: Lark in llguidance's dialect, FunctionGemma's control
tokens as special tokens.

Owns the translation of each tool's `parameters` JSON Schema into FunctionGemma's value syntax
(gemlora.text.tool_format: strings between <escape> tokens, bare keys, no spaces), keyword by keyword,
enforcing exactly what the schema says or refusing it:
- numbers, integers, booleans and null, with their keywords (minimum, maximum, enum, ...), are JSON's own
  syntax in FunctionGemma's format too, so they go to llguidance's JSON grammar (`%json`);
- strings are `<escape>text<escape>` with text that holds no `<escape>`; `enum` / `const` of strings,
  `minLength`, `maxLength` and `pattern` become the text's regex;
- objects list their `properties` in the declared order, each `required` one always, the others optionally
  (no other members: a call never needs them); an object that declares no properties takes any members;
- arrays take `items` (any value without it), with `minItems` 0 or 1;
- `anyOf`, a list of types, and no type at all (any value) are alternatives.
Any other keyword that constrains (`format`, `$ref`, `allOf`, `oneOf`, `not`, `maxItems`, ...) is refused with
OutputFormatError naming it: never accepted and left unenforced. Knows schemas and FunctionGemma's syntax;
nothing of tokens, the engine or HTTP.
"""

from __future__ import annotations

import json
import re

from gemlora.structured.json_grammars import JSON_STYLE
from gemlora.structured.output_format import OutputFormatError
from gemlora.text.tool_format import END_CALL, ESCAPE, START_CALL

_ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
                "$schema", "$id"}
_SCALAR_KEYWORDS = {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                    "multipleOf"}
_STRING_KEYWORDS = {"type", "enum", "const", "minLength", "maxLength", "pattern", "format"}
_OBJECT_KEYWORDS = {"type", "properties", "required", "additionalProperties"}
_ARRAY_KEYWORDS = {"type", "items", "minItems", "maxItems"}
MAX_SPELLED_ITEMS = 64      # an array's bounds are written out item by item, up to this many
# formats as regexes that admit only valid values (a strict subset where the standard allows more)
_D, _T = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
_ZONE = r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {"date": _D, "time": _T + _ZONE + "?", "date-time": _D + "T" + _T + _ZONE,
           "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
           "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
           "uri": r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#@!$&'()*+,;=%\[\]]+"}
_NO_ESCAPE = "~/(?s:.*" + re.escape(ESCAPE).replace("/", "\\/") + ".*)/"


class _Rules:
    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] = []
        self._n = 0
        self._any = False

    def add(self, body: str, token: bool = False) -> str:
        self._n += 1
        name = f"T{self._n}" if token else f"r{self._n}"
        self.lines.append(f"{name}: {body}")
        return name

    def refuse(self, why: str):
        raise OutputFormatError(f"{self.where}: {why} cannot be enforced in FunctionGemma's call syntax; "
                                "use \"auto\" or leave it out", "tools")


def _check(rules: _Rules, schema: dict, allowed: set[str], kind: str) -> None:
    extra = sorted(set(schema) - allowed - _ANNOTATIONS)
    if extra:
        rules.refuse(f"the keyword {extra[0]!r} on {kind}")


def _value(rules: _Rules, schema) -> str:
    """The rule of one value valid against `schema`."""
    if schema is True or schema == {}:
        return _any(rules)
    if not isinstance(schema, dict):
        rules.refuse("a schema that is not an object")
    if "anyOf" in schema:
        _check(rules, schema, {"anyOf"}, "anyOf")
        return rules.add(" | ".join(_value(rules, s) for s in schema["anyOf"]))
    kinds = schema.get("type")
    if kinds is None:
        if "const" in schema or "enum" in schema:
            return _enum(rules, schema)
        if set(schema) - _ANNOTATIONS:
            rules.refuse(f"the keyword {sorted(set(schema) - _ANNOTATIONS)[0]!r} without a type")
        return _any(rules)
    if isinstance(kinds, list):
        return rules.add(" | ".join(_value(rules, {**schema, "type": k}) for k in kinds))
    if kinds == "string":
        return _string(rules, schema)
    if kinds in ("number", "integer", "boolean", "null"):
        _check(rules, schema, _SCALAR_KEYWORDS, kinds)
        return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, separators=(",", ":"))
    if kinds == "object":
        return _object(rules, schema)
    if kinds == "array":
        return _array(rules, schema)
    rules.refuse(f"the type {kinds!r}")


def _enum(rules: _Rules, schema: dict) -> str:
    values = [schema["const"]] if "const" in schema else list(schema["enum"])
    if not values:
        rules.refuse("an empty enum")
    return rules.add(" | ".join(_literal(rules, v) for v in values))


def _literal(rules: _Rules, value) -> str:
    if isinstance(value, str):
        if ESCAPE in value:
            rules.refuse("a string holding <escape>")
        return f"{ESCAPE} {json.dumps(value)} {ESCAPE}" if value else f"{ESCAPE} {ESCAPE}"
    if isinstance(value, (dict, list)):
        rules.refuse("an enum of objects or arrays")
    return json.dumps(json.dumps(value))             # true, 3, null: the same text as JSON's


def _string(rules: _Rules, schema: dict) -> str:
    _check(rules, schema, _STRING_KEYWORDS, "a string")
    if "const" in schema or "enum" in schema:
        return _enum(rules, schema)
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    text = [f"/(?s:.{{{lo},{'' if hi is None else hi}}})/", _NO_ESCAPE]
    if "pattern" in schema:                     # JSON Schema's pattern matches anywhere, unless anchored
        pattern = schema["pattern"]
        head = "" if pattern.startswith("^") else "(?s:.*)"
        tail = "" if pattern.endswith("$") and not pattern.endswith("\\$") else "(?s:.*)"
        core = pattern.removeprefix("^").removesuffix("$") if tail == "" else pattern.removeprefix("^")
        text.append("/" + head + "(?:" + core.replace("/", "\\/") + ")" + tail + "/")
    if "format" in schema:
        if schema["format"] not in FORMATS:
            rules.refuse(f"the string format {schema['format']!r}")
        text.append("/" + FORMATS[schema["format"]].replace("/", "\\/") + "/")
    return f"{ESCAPE} " + rules.add(" & ".join(text), token=True) + f" {ESCAPE}"


def _object(rules: _Rules, schema: dict) -> str:
    _check(rules, schema, _OBJECT_KEYWORDS, "an object")
    props = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    if required - set(props):
        rules.refuse(f"the required member {sorted(required - set(props))[0]!r} with no schema in properties")
    if not props:
        _any(rules)
        return "any_object"
    for name in props:
        _check_key(rules, name)
    members = [(name, f'"{name}:" {_value(rules, sub)}', name in required) for name, sub in props.items()]
    # after[k][first]: the members from the k-th on, `first` when none has been written yet
    after = {len(members): {True: None, False: None}}
    for k in range(len(members) - 1, -1, -1):
        _, member, needed = members[k]
        after[k] = {}
        for first in (True, False):
            rest = after[k + 1][False]
            taken = ("" if first else '"," ') + member + (f" {rest}" if rest else "")
            if needed:
                after[k][first] = rules.add(taken)
            else:
                skipped = after[k + 1][first]
                after[k][first] = rules.add(f"{taken} | {skipped}" if skipped else f"({taken})?")
    return rules.add(f'"{{" {after[0][True]} "}}"')


def _check_key(rules: _Rules, name: str) -> None:
    if not name or any(c in name for c in ':{},[]"\\') or ESCAPE in name or not name.isprintable():
        rules.refuse(f"the member name {name!r}")


def _array(rules: _Rules, schema: dict) -> str:
    _check(rules, schema, _ARRAY_KEYWORDS, "an array")
    item = _value(rules, schema.get("items", True))
    least, most = schema.get("minItems", 0), schema.get("maxItems")
    if max(least, most or 0) > MAX_SPELLED_ITEMS:
        rules.refuse(f"an array bound above {MAX_SPELLED_ITEMS}")
    if most is not None and most < least:
        rules.refuse("maxItems below minItems")
    # items after the first: the required ones, then each optional one nested in the one before
    rest = f'("," {item})*' if most is None else ""
    for _ in range(max(0, (most or 0) - max(least, 1))):
        rest = f'("," {item} {rest})?'
    items = " ".join([item] + [f'"," {item}'] * max(0, least - 1) + ([rest] if rest else []))
    if most == 0:
        return rules.add('"[" "]"')
    return rules.add(f'"[" {items} "]"' if least else f'"[" ({items})? "]"')


def _any(rules: _Rules) -> str:
    """Any value (defined once per grammar)."""
    if not rules._any:
        rules._any = True
        string = _string(rules, {"type": "string"})
        scalar = '%json {"type":["number","boolean","null"]}'
        rules.lines.append(f'any_value: {string} | {scalar} | any_object | "[" (any_value ("," any_value)*)? "]"')
        rules.lines.append('any_object: "{" (ANY_KEY ":" any_value ("," ANY_KEY ":" any_value)*)? "}"')
        rules.lines.append(r'ANY_KEY: /[^:{},\[\]"\\<\s][^:{},\[\]"\\<]*/')
    return "any_value"


def calls_rules(tools, parallel: bool) -> list[str]:
    """The Lark rules of `calls`: FunctionGemma calls of `tools` (ToolSpecs), one, or with `parallel` one or
    more. OutputFormatError (field "tools") for a schema it cannot enforce."""
    rules = _Rules("tools")
    alternatives = []
    for i, tool in enumerate(tools):
        rules.where = f"tools[{i}] ({tool.name})"
        alternatives.append(f'"call:{tool.name}" {_value(rules, dict(tool.parameters))}')
    call = rules.add(f"{START_CALL} ({' | '.join(alternatives)}) {END_CALL}")
    return [f"calls: {call}+" if parallel else f"calls: {call}", *rules.lines]
