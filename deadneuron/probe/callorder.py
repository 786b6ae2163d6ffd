"""Call order: how the sites of one place are told apart, and when that cannot be trusted.

Calls of one activation from one place (the same module, or the same function inside the same module,
fed by the same producer) are told apart by their order in the forward pass: the k-th call is site ``#k``.
That is stable while every forward pass makes the same calls. Where the count of such calls changes from
one forward pass to another (a branch taken on some batches only, layers dropped at random), the k-th call
can be another layer on another batch, and a site would merge them with no word: `CallOrder` notes the
range of counts per place over the forward passes, and names the places whose count changed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from deadneuron._text import few


class CallOrder:
    """Per place (a hashable key), the number of calls in the running forward pass, and the least and
    most seen in any forward pass that called it."""

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}
        self._spread: dict[Hashable, tuple[int, int]] = {}

    def next(self, place: Hashable) -> int:
        """The occurrence number of this call of ``place`` in the running forward pass (0 for the first)."""
        occurrence = self._counts.get(place, 0)
        self._counts[place] = occurrence + 1
        return occurrence

    def end_forward(self) -> None:
        """Fold the running forward pass's counts into the spread and start the next pass's."""
        _fold(self._spread, self._counts)
        self._counts.clear()

    def _folded(self) -> dict[Hashable, tuple[int, int]]:
        return _fold(dict(self._spread), self._counts)

    def warnings(self, keyed_sites: Sequence[tuple[tuple[Any, ...], str, Any]]) -> list[str]:
        """One line per place whose call count changed between forward passes (the running one included),
        naming its sites (``keyed_sites``: (key, final name, site), a key being (*place, occurrence))."""
        out = []
        for place, (low, high) in self._folded().items():
            if low == high:
                continue
            names = [name for key, name, _ in keyed_sites if key[:-1] == place]
            out.append(
                f"sites {few(names)} are told apart by the order of their calls, and the number of calls changed "
                f"between forward passes ({low} to {high}): a site may merge "
                "calls from different layers on different batches; give each place its own activation "
                "module, or a module before it, to keep them apart"
            )
        return out


def _fold(spread: dict[Hashable, tuple[int, int]], counts: dict[Hashable, int]) -> dict[Hashable, tuple[int, int]]:
    """``spread`` (changed in place and returned) widened by one forward pass's ``counts``."""
    for place, count in counts.items():
        low, high = spread.get(place, (count, count))
        if count < low or count > high or place not in spread:
            spread[place] = (min(low, count), max(high, count))
    return spread


__all__ = ["CallOrder"]
