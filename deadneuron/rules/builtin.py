"""The built-in rules, in the order that breaks ties between findings of equal severity."""

from __future__ import annotations

from deadneuron.rules.axis import AXIS_GUESSED
from deadneuron.rules.batchnorm import BN_SCALE_COLLAPSE
from deadneuron.rules.model import Rule, RuleSet
from deadneuron.rules.normalisation import NO_NORMALISATION
from deadneuron.rules.sites import (
    DEAD_RELU,
    DORMANT_LEAKY,
    NONFINITE,
    SPARSE_HEALTHY,
    STUCK_SMOOTH,
)
from deadneuron.rules.slot_rules import SLOT_COLLAPSE, SLOTS_DIFFUSE
from deadneuron.rules.training import AUDIT_CAVEATS, BELOW_BASELINE, LR_DYING, OVER_TRAINING

# Caveats come before the findings they qualify; dead channels before what may have caused them.
BUILTIN_RULES: tuple[Rule, ...] = (
    NONFINITE,
    AUDIT_CAVEATS,
    AXIS_GUESSED,
    DEAD_RELU,
    DORMANT_LEAKY,
    STUCK_SMOOTH,
    NO_NORMALISATION,
    BN_SCALE_COLLAPSE,
    LR_DYING,
    OVER_TRAINING,
    BELOW_BASELINE,
    SLOT_COLLAPSE,
    SLOTS_DIFFUSE,
    SPARSE_HEALTHY,
)


def builtin_rules() -> RuleSet:
    return RuleSet(BUILTIN_RULES)
