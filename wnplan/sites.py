"""Site selection: which sites a sweep covers, chosen by index, name or operator type."""

from __future__ import annotations

from collections.abc import Sequence

from wnplan.errors import SiteError
from wnplan.models.base import Site


def select_sites(sites: Sequence[Site], selection: str | None) -> list[int]:
    """Return the indices of the sites named by a comma-separated selection.

    Each entry is a site index (`3`), an index range (`2-5`), a site name (`features.0`), or
    an operator type matched without regard to case (`conv`, `Relu`, `batch_norm`). None or
    an empty string selects every site.

    Raises:
        SiteError: an entry matches no site.
    """
    if selection is None or not selection.strip():
        return [site.index for site in sites]

    chosen: set[int] = set()
    for entry in (part.strip() for part in selection.split(",")):
        if not entry:
            continue
        matches = _match(sites, entry)
        if not matches:
            names = ", ".join(site.name for site in sites[:8])
            more = f", … ({len(sites)} in all)" if len(sites) > 8 else ""
            ops = ", ".join(sorted({site.op for site in sites}))
            raise SiteError(
                f"no site matches {entry!r}: use an index 0-{len(sites) - 1}, a name ({names}{more}), "
                + f"or an operator type ({ops}); `wnplan sites MODEL` lists them"
            )
        chosen.update(matches)
    return sorted(chosen)


def _match(sites: Sequence[Site], entry: str) -> list[int]:
    if _is_number(entry):
        index = int(entry)
        return [index] if index < len(sites) else []
    low, dash, high = entry.partition("-")
    if dash and _is_number(low) and _is_number(high):
        return [site.index for site in sites if int(low) <= site.index <= int(high)]
    lowered = entry.lower()
    by_name = {site.index for site in sites if entry in (site.name, site.module)}
    by_op = {site.index for site in sites if site.op.lower() == lowered}
    if by_op:
        # An exact op type selects every site of that type, even when a site is also named
        # like it (torch.export names the first ReLU node "relu").
        return sorted(by_name | by_op)
    if by_name:
        return sorted(by_name)
    return [site.index for site in sites if site.op.lower().startswith(lowered)]


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()
