"""One validation layer for config keys and command-line arguments: numbers in every notation
(``0.001``, ``1e-3``, ``2/255``), integers, booleans, choices with "did you mean …", folder names
that stay inside their parent. Every failure is a :class:`~cure_fast.errors.ConfigError` whose one-line
message names the key and what is allowed.

>>> parse_number("2/255", "eps_inf"), parse_number("1e-4", "lr")
>>> Number(low=0, high=1)("alpha", "0.5")          # 0.5
>>> parser = OneLineParser(prog="cure-fast")         # argparse errors as one line, exit status 2
>>> parser.add_argument("--limit", type=integer_type(1))
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from typing import Any, Iterable, Optional, Sequence, Tuple

from .errors import ConfigError

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_PLAIN = re.compile(rf"^\s*{_NUMBER}\s*$")
NUMBER_HINT = "e.g. 0.001, 1e-3 or 2/255"


SYNONYMS = {"gpu": "cuda", "linf": "inf", "l_inf": "inf", "infinity": "inf", "l2": "2", "l1": "1"}
"""Words users write for a choice spelt otherwise here (``--device gpu`` means cuda, not cpu)."""


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word``, or ``""``."""
    word, choices = str(word), [str(c) for c in choices]
    if SYNONYMS.get(word.lower()) in choices:
        return f"; did you mean {SYNONYMS[word.lower()]!r}?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    close = close or [c for c in choices if len(c) > 1 and len(word) > 1 and (word.startswith(c) or c.startswith(word))]
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_number(value: Any, what: str) -> float:
    """A finite number from an int, a float or a string in decimal or scientific notation or a
    fraction ``a/b``; ``what`` names the key in the error."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{what}={value!r} is not a number ({NUMBER_HINT})")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and _PLAIN.match(value):
        number = float(value)
    elif isinstance(value, str) and _FRACTION.match(value):
        top, bottom = (float(v) for v in _FRACTION.match(value).groups())
        if bottom == 0:
            raise ConfigError(f"{what}={value!r} divides by zero")
        number = top / bottom
    else:
        raise ConfigError(f"{what}={value!r} is not a number ({NUMBER_HINT})")
    if not math.isfinite(number):
        raise ConfigError(f"{what}={value!r}; a finite number")
    return number


def _interval(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    low_text, high_text = (f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low_text}, {high_text}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low_text}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high_text}"
    return "any value"


class Rule:
    """A check of one key: ``rule(key, value)`` returns the value in its proper type or raises
    :class:`ConfigError`; ``allowed`` says in words what passes."""
    allowed = "any value"
    optional = False

    def __call__(self, key: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        return self.check(key, value)

    def check(self, key: str, value: Any) -> Any:
        return value

    def fail(self, key: str, value: Any, extra: str = ""):
        allowed = self.allowed + (", or null" if self.optional and "null" not in self.allowed else "")
        shown = "null (empty)" if value is None else repr(value)
        raise ConfigError(f"{key}={shown}; {allowed}{extra}")


class Number(Rule):
    def __init__(self, low=None, high=None, low_open=False, high_open=False, optional=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.optional = optional
        self.allowed = f"a number {_interval(low, high, low_open, high_open)} ({NUMBER_HINT})"

    def check(self, key, value):
        try:
            number = parse_number(value, key)
        except ConfigError as error:
            if "divides by zero" in str(error):
                raise
            self.fail(key, value)
        if ((self.low is not None and (number < self.low or self.low_open and number == self.low))
                or (self.high is not None and (number > self.high or self.high_open and number == self.high))):
            self.fail(key, value)
        return number


class Integer(Rule):
    def __init__(self, low: Optional[int] = None, optional: bool = False, note: str = "", high: Optional[int] = None):
        self.low, self.high, self.optional = low, high, optional
        self.allowed = f"an integer {_interval(low, high, False, False)}{note}"

    def check(self, key, value):
        if isinstance(value, bool):
            self.fail(key, value)
        try:
            number = parse_number(value, key)
        except ConfigError:
            self.fail(key, value)
        if number != int(number) or (self.low is not None and number < self.low) or (
                self.high is not None and number > self.high):
            self.fail(key, value)
        return int(number)


class Boolean(Rule):
    allowed = "true or false"
    WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def check(self, key, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self.WORDS:
            return self.WORDS[value.strip().lower()]
        self.fail(key, value)


class Choice(Rule):
    """One of ``choices``: a sequence, or a mapping read at every check (names registered later count)."""

    def __init__(self, choices: Iterable[str], optional: bool = False):
        self.source, self.optional = choices, optional

    @property
    def choices(self) -> Tuple[str, ...]:
        return tuple(self.source)

    @property
    def allowed(self) -> str:
        return f"choose one of {', '.join(self.choices)}"

    def check(self, key, value):
        if str(value) not in self.choices or isinstance(value, bool):
            self.fail(key, value, did_you_mean(value, self.choices))
        return str(value)


class Text(Rule):
    def __init__(self, optional: bool = False, allowed: str = "a non-empty string"):
        self.optional, self.allowed = optional, allowed

    def check(self, key, value):
        if isinstance(value, (dict, list, bool)) or value is None or not str(value).strip():
            self.fail(key, value)
        return str(value)


class FolderName(Rule):
    """One folder name: it cannot climb out of (or reach around) the folder it is created in."""
    allowed = ("a folder name (letters, digits and . _ - + = @, not starting with '.', no '/'): "
               "the run writes to out_dir/NAME")
    PATTERN = re.compile(r"^[\w+=@-][\w.+=@-]{0,127}$")

    def check(self, key, value):
        if isinstance(value, (bool, dict, list)) or value is None or not self.PATTERN.match(str(value)):
            self.fail(key, value)
        return str(value)


class IntegerList(Rule):
    def __init__(self, low: int = 0, increasing: bool = True):
        self.item, self.increasing = Integer(low), increasing
        self.allowed = f"a list of {'increasing ' if increasing else ''}integers >= {low}, e.g. [100, 150]"

    def check(self, key, value):
        if not isinstance(value, (list, tuple)):
            self.fail(key, value)
        items = [self.item(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if self.increasing and sorted(items) != items:
            raise ConfigError(f"{key}={value!r} must be increasing")
        return items


class ChoiceList(Rule):
    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(choices)
        self.allowed = f"a non-empty list of distinct values from {', '.join(self.choices)}"

    def check(self, key, value):
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)) or not items:
            self.fail(key, value)
        items = [str(v) for v in items]
        if len(items) == 1 and "," in items[0]:  # norms=inf,2: a string, not a list
            parts = [part.strip() for part in items[0].split(",")]
            self.fail(key, value, f"; write a list in brackets: {key}=[{', '.join(parts)}]")
        wrong = [v for v in items if v not in self.choices]
        if wrong or len(set(items)) != len(items):
            self.fail(key, value, did_you_mean(wrong[0], self.choices) if wrong else "")
        return items


class Mapping(Rule):
    allowed = "a mapping of keyword arguments, e.g. {width: 8}"

    def check(self, key, value):
        if not isinstance(value, dict):
            self.fail(key, value)
        return dict(value)


# ---------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2), with "did you mean …"
    for a wrong choice."""

    def parse_args(self, args=None, namespace=None):
        """Unknown options are reported by the (sub)command that was given, with "did you mean …"."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self._command(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _command(self, parsed: argparse.Namespace) -> "OneLineParser":
        """The parser of the subcommand ``parsed`` names (self when there is none)."""
        for action in self._subparsers._group_actions if self._subparsers else []:
            chosen = action.choices.get(getattr(parsed, action.dest or "", None) or "")
            if chosen is not None:
                return chosen
        return self

    def error(self, message: str):
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = re.findall(r"'([^']*)'", match.group(2))
            message += did_you_mean(match.group(1), choices)
        unknown = re.search(r"unrecognized arguments: (-[^\s=]+)", message)
        if unknown:
            message += did_you_mean(unknown.group(1), [o for o in self._option_string_actions if o.startswith("--")])
        elif re.search(r"unrecognized arguments: .*\b\w+=", message) and "--set" in self._option_string_actions:
            message += "; give each KEY=VALUE its own --set"
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _argument_type(rule: Rule, name: str):
    def parse(text: str):
        try:
            return rule("value", text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).replace("value=", "got ", 1)) from None
    parse.__name__ = name
    return parse


def integer_type(low: int):
    """An argparse ``type=``: an integer >= ``low`` (scientific notation accepted: 1e5)."""
    return _argument_type(Integer(low), f"integer >= {low}")


def number_type(low: Optional[float] = None, low_open: bool = False, high: Optional[float] = None):
    """An argparse ``type=``: a finite number in the range, in any notation (1e-3, 2/255)."""
    return _argument_type(Number(low, high, low_open), "number")


def number_list(text: str, what: str, low_open_zero: bool = True) -> list:
    """``"0.25,0.5"`` -> [0.25, 0.5]; every item a number > 0 (any notation)."""
    rule = Number(0, low_open=low_open_zero)
    return [rule(what, item.strip()) for item in text.split(",") if item.strip()]
