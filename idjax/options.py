"""Settings declared once. A stage's configuration is a frozen dataclass whose fields carry their
default, help, choices and range (`option`); the `idjax` flags (`add_flags`), the YAML keys of
`idjax run` (`from_mapping`) and the Python constructor (`validate`, called by __post_init__) all
read them there, so a range or a list of choices is written in one place (levanter's and bergson's
configs work this way).

The messages name the setting the way its front end spells it: `--batch-size must be >= 1, got 0`
(CLI, exit 2), `key 'train.batch_size': must be >= 1, got 0` (YAML), `batch_size: must be >= 1,
got 0` (Python, a ValueError).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Check = Callable[[Any], "str | None"]  # value -> why it cannot be used, or None


class ConfigError(ValueError):
    """A setting no stage can work with. `key` names it (None when the message says it all)."""

    def __init__(self, text: str, key: str | None = None):
        super().__init__(f"{key}: {text}" if key else text)
        self.text, self.key = text, key


# ----------------------------------------------------------------------------- ranges


def rule(ok: Callable[[Any], bool], need: str) -> Check:
    """A range: `ok(value)` holds, else "must be <need>, got <value>"."""
    def check(value):
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        return None if good else f"must be {need}, got {value}"
    return check


AT_LEAST_1 = rule(lambda v: v >= 1, ">= 1")
AT_LEAST_2 = rule(lambda v: v >= 2, ">= 2")
NON_NEGATIVE = rule(lambda v: v >= 0, ">= 0")
POSITIVE = rule(lambda v: v > 0, "> 0")
FINITE_NON_NEGATIVE = rule(lambda v: 0 <= v < math.inf, "a finite number >= 0")
FINITE_POSITIVE = rule(lambda v: 0 < v < math.inf, "a finite number > 0")
FRACTION = rule(lambda v: 0 < v <= 1, "in (0, 1]")
UNIT_INTERVAL = rule(lambda v: 0 <= v <= 1, "in [0, 1]")
MOMENTUM = rule(lambda v: 0 <= v < 1, "in [0, 1)")


def parse_bytes(text: str) -> int:
    """'80GB', '16 GiB', '512MB', or a plain number of bytes (binary units either way)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 16GiB)")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def memory_size(value) -> str | None:
    """Why `value` is not a memory size such as '24GB' (None: it is)."""
    try:
        parse_bytes(value)
    except ValueError as e:
        return str(e)
    return None


def regex(value) -> str | None:
    """A regular expression over parameter names."""
    try:
        re.compile(value)
    except re.error as e:
        return f"{value!r} is not a regular expression ({e})"
    return None


def option(default=dataclasses.MISSING, help: str = "", *, choices: Iterable | None = None,
           check: Check | None = None, flag: str | None = None, cli: bool = True):
    """A config field with its declaration: `help` for --help, `choices` (None among them: unset is
    allowed), `check` (a range; None values are never checked: None means "off" or "automatic"),
    `flag` (the CLI name when it is not the field name with dashes), `cli` (False: Python and YAML only).
    """
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "check": check,
            "flag": flag, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def like(cls, name: str, **changes):
    """The declaration of `cls.name` again (another config's key for the same setting), with `changes`
    (e.g. default=...) applied; the field remembers where it came from (metadata "same_as")."""
    src = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**src.metadata, "same_as": (cls, name)}
    default = changes.pop("default", src.default)
    meta.update(changes)
    return dataclasses.field(default=default, metadata=meta)


def shared_fields(config, cls) -> dict:
    """{name in cls: value} of the fields of `config` declared `like(cls, name)`."""
    return {f.metadata["same_as"][1]: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("same_as", (None,))[0] is cls}


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def problems(config, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, why) for every field value outside its declared choices or range; nested configs'
    keys get their field's name as a prefix ("train.lr")."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from problems(value, prefix + f.name + ".")
            continue
        allowed, check = f.metadata.get("choices"), f.metadata.get("check")
        if allowed is not None and value not in allowed:
            yield prefix + f.name, f"expected one of {', '.join(str(a) for a in allowed if a is not None)}, " \
                                   f"got {_show(value)}"
        elif check is not None and value is not None and not isinstance(value, bool):
            why = check(value)
            if why:
                yield prefix + f.name, why


def validate(config) -> None:
    """Raise ConfigError for the first field outside its declaration (for __post_init__)."""
    for key, why in problems(config):
        raise ConfigError(why, key)


# ----------------------------------------------------------------------------- CLI flags


def _flag(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def _scalar(hint):
    """The argparse type of an annotation: int, float, str or bool (Optional[X] is X; int | float is float)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return float if set(args) == {int, float} else _scalar(args[0])
    return hint


def add_argument(parser, flag: str, *, check: Check | None = None, **kwargs):
    """parser.add_argument, with `check` run on the parsed value by `flag_problem` (before any work)."""
    action = parser.add_argument(flag, **kwargs)
    if check is not None:
        checks = list(parser.get_default("option_checks") or ())
        parser.set_defaults(option_checks=checks + [(action.dest, flag, check)])
    return action


def add_flags(parser, cls, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
              defaults: dict | None = None, exclusive: Iterable[str] = (), group: str | None = None) -> None:
    """One flag per field of the config class `cls` (not those declared cli=False or in `skip`; only
    those in `only` when given): type from the annotation, default, help, choices and range from the
    declaration. A bool field defaulting to True becomes --no-NAME. `defaults` overrides field defaults
    for this command; `exclusive` names fields that are mutually exclusive flags."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group) if group else parser  # groups share the parser's defaults
    mutex = target.add_mutually_exclusive_group() if exclusive else None
    exclusive, skip = set(exclusive), set(skip)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip or (only is not None and f.name not in only):
            continue
        kind = _scalar(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)  # argparse.SUPPRESS: absent from args unless given
        shown = f.default if default is argparse.SUPPRESS else default
        help_text = f.metadata.get("help", "")
        where = mutex if f.name in exclusive else target
        if kind is bool:
            flag = _flag(f) if not shown else "--no-" + _flag(f)[2:]
            where.add_argument(flag, dest=f.name, action="store_false" if shown else "store_true", help=help_text,
                               **({"default": default} if default is argparse.SUPPRESS else {}))
            continue
        if default is dataclasses.MISSING:
            kwargs = {"required": True}
        else:
            kwargs = {"default": default}
            if shown is not None and "default" not in help_text:
                help_text = f"{help_text} (default {shown})" if help_text else f"default {shown}"
        choices = f.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = [c for c in choices if c is not None]
        add_argument(where, _flag(f), check=f.metadata.get("check"), dest=f.name, type=kind, help=help_text,
                     metavar=None if choices is not None else _flag(f)[2:].upper().replace("-", "_"), **kwargs)


def from_args(cls, args: argparse.Namespace, **values):
    """cls built from the parsed flags of its fields (as add_flags made them), with `values` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    found = {n: getattr(args, n) for n in names if hasattr(args, n) and n not in values}
    return cls(**found, **values)


def flag_problem(args: argparse.Namespace) -> str | None:
    """The first flag whose value is outside its declared range ("--k must be >= 1, got 0"), or None."""
    for dest, flag, check in getattr(args, "option_checks", None) or ():
        value = getattr(args, dest, None)
        if value is not None and not isinstance(value, bool):
            why = check(value)
            if why:
                return f"{flag} {why}"
    return None


# ----------------------------------------------------------------------------- YAML mappings


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(value, hint, key: str):
    """`value` checked against the annotation `hint`; ConfigError names the key otherwise.

    Numbers written like 1e-5 are strings to YAML 1.1 (it wants 1.0e-5), so a string that parses
    as a float is accepted where a float is expected.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if set(options) == {int, float}:  # k: a count or a fraction
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _convert(value, float, key)
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return _convert(value, options[0], key)  # its own keys' errors name them
        if len(options) == 1:
            try:
                return _convert(value, options[0], key)
            except ConfigError:
                raise ConfigError(f"expected {_describe(hint)}, got {value!r}", key) from None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping (nested keys), got {value!r}", key)
        return from_mapping(hint, value, key + ".")
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool)}
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"expected a number, got {value!r}", key)
    if hint in ok:
        if ok[hint](value):
            return value
        raise ConfigError(f"expected {_describe(hint)}, got {value!r}", key)
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")


def from_mapping(cls, mapping: dict, prefix: str = ""):
    """cls from a mapping of its field names (a YAML file): unknown keys (with a "did you mean"),
    missing keys, types and the declared ranges are each a ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{prefix}{key}' ({hint})")
    missing = [n for n, f in fields.items() if n not in mapping and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}'")
    values = {k: _convert(v, hints[k], prefix + k) for k, v in mapping.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        if e.key is None:
            raise
        raise ConfigError(e.text, prefix + e.key) from None
