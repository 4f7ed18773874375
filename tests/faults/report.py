"""The table of faults injected and what each left behind, printed after the fault tests (with
``-s`` as each test ends, and always in pytest's terminal summary)."""

from __future__ import annotations

from dataclasses import dataclass

from tests.faults.flows import Verdict


@dataclass(frozen=True)
class Row:
    """One fault scenario: what was injected, and one verdict per flow."""

    scenario: str
    injected: str
    verdicts: tuple[Verdict, ...]
    #: Publishes that raised, by error, during the scenario.
    errors: str = ""
    #: Workers or producers that did not reconnect by themselves.
    reconnect: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reconnect and all(v.ok for v in self.verdicts)


#: Rows of this session, in the order the scenarios ran.
ROWS: list[Row] = []

_HEAD = (
    f"{'scenario':<22} {'flow':<17} {'confirmed':>9} {'raised':>6} {'final':>6} {'lost':>4} "
    f"{'dups':>4} {'bound':>5}  result"
)


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width table, with each failing flow's problems under it."""
    lines = [_HEAD, "-" * len(_HEAD)]
    for row in rows:
        for i, v in enumerate(row.verdicts):
            name = row.scenario if i == 0 else ""
            lines.append(
                f"{name:<22} {v.flow:<17} {v.confirmed:>9} {v.raised:>6} {v.final:>6} "
                f"{v.lost:>4} {v.duplicates:>4} {v.bound:>5}  {'ok' if v.ok else 'FAILED'}"
            )
            lines += [f"{'':<22}   ! {p}" for p in v.problems]
        lines.append(f"{'':<22} injected: {row.injected}")
        lines += [f"{'':<22} ! {p}" for p in row.reconnect]
        if row.errors:
            lines.append(f"{'':<22} publishes that raised: {row.errors}")
    return "\n".join(lines)
