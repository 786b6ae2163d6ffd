"""The rule engine's values (DESIGN section 5): Severity, Threshold, Evidence, Fix, Rule (Finding: finding.py).

A rule is data: an id, a title, a severity, the metrics it reads, its thresholds (with defaults), a
predicate that turns a Report and a RuleContext into *hits* (each with structured evidence and the values
its sentence needs), message and suggestion templates rendered from those values, and the fixes (patch
ops of `deadneuron.ops`, each fix with the exact ``deadneuron patch`` command) that would apply it. Pure:
no I/O.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from deadneuron.errors import DeadneuronError, UsageError
from deadneuron.ops import DEFAULT_CHECKPOINT, Op

if TYPE_CHECKING:
    from deadneuron.report import Report
    from deadneuron.rules.context import RuleContext

Comparison = Literal[">=", "<=", ">", "<"]


class RuleError(DeadneuronError):
    """A rule could not be loaded or raised while evaluating; the message names the rule."""


class Severity(Enum):
    """How bad a finding is. Ordered: ERROR > WARNING > INFO."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank


@dataclass(frozen=True)
class Threshold:
    """One tunable number of a rule: its default, what it means, and the values it may take."""

    name: str
    default: float
    help: str
    integer: bool = False
    lo: float | None = None
    hi: float | None = None

    def validate(self, value: object, *, where: str) -> float:
        """``value`` checked for type and range; a UsageError naming ``where`` otherwise."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: {self.name} must be {kind}, got {value!r}")
        if self.integer and isinstance(value, float) and not value.is_integer():
            raise UsageError(f"{where}: {self.name} must be an integer, got {value!r}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise UsageError(f"{where}: {self.name} must be in {self.range_text()}, got {value!r}")
        return int(value) if self.integer else float(value)

    def range_text(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"[{lo}, {hi}]"


@dataclass(frozen=True)
class Evidence:
    """One measured fact behind a finding: ``observed <comparison> threshold`` held for ``metric``."""

    metric: str
    observed: float
    threshold: float
    comparison: Comparison
    site: str | None = None

    def holds(self) -> bool:
        o, t = self.observed, self.threshold
        return {">=": o >= t, "<=": o <= t, ">": o > t, "<": o < t}[self.comparison]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "site": self.site,
            "observed": self.observed,
            "threshold": self.threshold,
            "comparison": self.comparison,
        }


@dataclass(frozen=True)
class Fix:
    """One thing to try: the ops that apply it, requested together by one ``deadneuron patch`` command."""

    ops: tuple[Op, ...]

    def command(self, subject: str | Sequence[str] | None, *, adapter_model: bool = False) -> str:
        """The shell command, every word quoted where needed (site names hold ``>``). ``subject``: the
        checkpoint path, or the words naming the subject (the path and flags such as ``--model``). The
        command writes its own ``--out`` beside the checkpoint (without a subject: the default one),
        named after the fix (`patched_out`), so that the commands suggested for one checkpoint run as
        printed in any order."""
        words = [subject] if isinstance(subject, str) else list(subject or ())
        flags = [w for op in self.ops for w in op.flags(adapter_model=adapter_model)]
        out = ["--out", patched_out(words[0] if words else DEFAULT_CHECKPOINT, flags)]
        return " ".join(["deadneuron", "patch", *(shlex.quote(w) for w in [*words, *flags, *out])])


_NAMED = {"--activation": "", "--negative-slope": "slope", "--lr": "lr", "--lr-scale": "lrx", "--epochs": "epochs",
          "--dropout-between-convs": "dropout", "--reinit-dead": "reinit", "--add-batchnorm": "batchnorm"}  # fmt: skip


def patched_out(checkpoint: str, flags: Sequence[str]) -> str:
    """Where a suggested ``deadneuron patch`` command writes: beside ``checkpoint``, named after the fix's
    ``flags`` (``net.pth`` + ``--activation leaky --lr 5e-5`` -> ``net_leaky_lr5e-5.pth``), with a digest
    of the ``--select`` globs where it selects sites (``--reinit-dead --select 'conv2>relu'`` ->
    ``net_reinit_1a2b3c.pth``), so that two fixes never share a file. Short enough to stay one word
    where a terminal wraps the command."""
    words, sites = [], []
    it = iter(flags)
    for word in it:
        if word == "--select":
            sites.append(next(it, ""))
        elif word == "--init":  # --init checkpoint comes with --reinit-dead: it names nothing new
            next(it, "")
        elif word in _NAMED and word not in ("--reinit-dead", "--add-batchnorm"):
            words.append(_NAMED[word] + next(it, ""))
        else:
            words.append(_NAMED.get(word, word.lstrip("-")))
    if sites:  # the command lists them; a digest keeps the name short and apart from other sites' fixes
        words.append(hashlib.sha256(chr(0).join(sites).encode()).hexdigest()[:6])
    slug = re.sub(r"[^A-Za-z0-9.+_-]+", "-", "_".join(words)) or "fix"
    path = PurePath(checkpoint)
    if not path.name:
        path = PurePath(path, "checkpoint")
    return str(path.with_name(f"{path.stem}_{slug}{path.suffix or '.pth'}"))


def freeze_channels(channels: Mapping[str, Sequence[int]]) -> Mapping[str, tuple[int, ...]]:
    return MappingProxyType({site: tuple(int(c) for c in ids) for site, ids in channels.items()})


@dataclass(frozen=True)
class Hit:
    """What a predicate found once: where, the evidence, and the values the rule's templates use."""

    evidence: tuple[Evidence, ...]
    values: Mapping[str, Any] = field(default_factory=dict)
    sites: tuple[str, ...] = ()
    channels: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "channels", freeze_channels(self.channels))


Predicate = Callable[["Report", "RuleContext", Mapping[str, float]], Sequence[Hit]]
FixBuilder = Callable[[Hit, "RuleContext", Mapping[str, float]], Sequence[Fix]]


def no_fixes(hit: Hit, context: RuleContext, thresholds: Mapping[str, float]) -> Sequence[Fix]:
    return ()


@dataclass(frozen=True)
class Rule:
    """A rule as data. ``message`` and ``suggestion`` are ``str.format`` templates over a hit's values."""

    id: str
    title: str
    severity: Severity
    reads: tuple[str, ...]
    thresholds: tuple[Threshold, ...]
    predicate: Predicate
    message: str
    suggestion: str = ""
    fixes: FixBuilder = no_fixes

    def threshold(self, name: str) -> Threshold:
        for t in self.thresholds:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def defaults(self) -> dict[str, float]:
        return {t.name: t.default for t in self.thresholds}


@dataclass(frozen=True)
class RuleSet:
    """An ordered collection of rules with unique ids (order breaks ties between equal severities)."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise RuleError(f"not a deadneuron Rule: {rule!r}")
            if rule.id in seen:
                raise RuleError(f"two rules share the id {rule.id!r}; rule ids must be unique")
            seen.add(rule.id)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self.ids

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)

    def get(self, rule_id: str) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise UsageError(f"unknown rule {rule_id!r}; valid rules: {', '.join(self.ids)}")

    def plus(self, rules: Iterable[Rule]) -> RuleSet:
        return RuleSet((*self.rules, *rules))

    def without(self, rule_ids: Iterable[str]) -> RuleSet:
        drop = set(rule_ids)
        return RuleSet(tuple(r for r in self.rules if r.id not in drop))
