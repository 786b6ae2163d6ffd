"""Built-in rules about slot masks (DESIGN section 3, slots): collapse onto one slot, and masks that do
not segment at all. Neither has a patch: an activation swap does not fix slot attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deadneuron.report import Report
from deadneuron.rules.common import pct
from deadneuron.rules.context import RuleContext
from deadneuron.rules.model import Evidence, Hit, Rule, Severity, Threshold

_SLOT_ADVICE = ("Fix dead or dormant encoder channels first: features that carry little give the slots nothing "
                "to split. Past that, this is slot attention's own problem (training length, slot count, "
                "iterations), which an activation swap will not address.")


def _slots(report: Report) -> Any:
    slots = report.slots
    if slots is None or slots.num_slots < 2 or slots.images < 1:
        return None
    return slots


def _common(slots: Any) -> dict[str, Any]:
    return {
        "num_slots": slots.num_slots, "active": f"{slots.mean_active:.2f}", "argmax": f"{slots.mean_argmax_active:.2f}",
        "mass": f"{slots.mean_mass_active:.2f}", "confidence": f"{slots.params.confidence:g}",
        "mass_threshold": pct(slots.params.mass_threshold),
    }  # fmt: skip


def _collapse(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    slots = _slots(report)
    if slots is None or slots.largest_slot_share < t["max_share"]:
        return []
    evidence = (Evidence("largest_slot_share", slots.largest_slot_share, t["max_share"], ">="),)
    return [Hit(evidence, {**_common(slots), "share": pct(slots.largest_slot_share), "threshold": pct(t["max_share"])})]


SLOT_COLLAPSE = Rule(
    id="slot-collapse",
    title="Slot collapse: one slot takes most of each image",
    severity=Severity.WARNING,
    reads=("slots.largest_slot_share", "slots.mean_active", "slots.mean_argmax_active"),
    thresholds=(Threshold("max_share", 0.8, "largest slot's mean share of an image's valid pixels", lo=0.0, hi=1.0),),
    predicate=_collapse,
    message=("One slot wins {share} of each image's valid pixels on average (threshold {threshold}): "
             "{argmax} of {num_slots} slots win any pixel per image and {active} own one with confidence >= "
             "{confidence}. On images mostly one background colour a large share can be right; compare the "
             "masks with the images."),
    suggestion=_SLOT_ADVICE,
)


def _diffuse(report: Report, context: RuleContext, t: Mapping[str, float]) -> list[Hit]:
    slots = _slots(report)
    if slots is None:
        return []
    histogram = list(slots.active_histogram)
    unowned = float(histogram[0]) / slots.images if histogram else 0.0
    evidence, reasons = [], []
    if slots.mask_entropy >= t["max_entropy"]:
        evidence.append(Evidence("mask_entropy", slots.mask_entropy, t["max_entropy"], ">="))
        reasons.append(f"normalised mask entropy {slots.mask_entropy:.2f} (1 = uniform; threshold {t['max_entropy']:g})")
    if unowned >= t["max_unowned_share"]:
        evidence.append(Evidence("images_without_confident_slot", unowned, t["max_unowned_share"], ">="))
        reasons.append(f"{pct(unowned)} of images have no slot owning a pixel with confidence >= "
                       f"{slots.params.confidence:g}")
    if not evidence:
        return []
    return [Hit(tuple(evidence), {**_common(slots), "reasons": "; ".join(reasons)})]


SLOTS_DIFFUSE = Rule(
    id="slots-diffuse",
    title="Slot masks do not segment",
    severity=Severity.WARNING,
    reads=("slots.mask_entropy", "slots.active_histogram"),
    thresholds=(
        Threshold("max_entropy", 0.9, "normalised mask entropy at or above this is near uniform", lo=0.0, hi=1.0),
        Threshold("max_unowned_share", 0.5, "share of images without any confident slot", lo=0.0, hi=1.0),
    ),
    predicate=_diffuse,
    message=("The slot masks do not segment: {reasons}. Counting slots by mass alone ({mass} per image hold "
             ">= {mass_threshold} of the mask) would hide this."),
    suggestion=_SLOT_ADVICE,
)
