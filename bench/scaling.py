"""The generated part of docs/scaling.md: each role's CPU per message, read from the committed
benchmark results, and a sizing model computed from those figures and the assumptions below
(named here, printed in the doc). ``python -m bench table`` writes it; nothing in it is typed
by hand, so a new recorded run moves the model with it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.table import RESULTS, _fmt, runs

DOC = Path(__file__).parent.parent / "docs" / "scaling.md"

# The workload and the rules of the model: assumptions, not measurements.
#: Contacts in the audience (campaigns to all of them are frozen in one statement).
CONTACTS = 10_000_000
#: Messages a day, every recipient of a campaign counted as one message.
MESSAGES_PER_DAY = 50_000_000
#: The busiest second's rate over the day's average.
PEAK_FACTOR = 3.0
#: The share of its cores a role may use at the peak: the rest absorbs bursts, retries and the
#: loss of one replica.
TARGET_UTILISATION = 0.5
#: Replicas of every role at least, so that losing one stops nothing.
MIN_REPLICAS = 2
#: RabbitMQ nodes: a quorum queue keeps accepting with a majority, so 3 survive one loss.
BROKER_NODES = 3
#: Single messages waiting in the delay ladder at once (a fifth of a day's volume scheduled about
#: a day ahead); campaigns do not wait in the broker, they fan out from Postgres.
PENDING_IN_LADDER = 10_000_000
#: Days of history kept in Postgres.
RETENTION_DAYS = 30
#: Row versions written per recipient: a campaign's recipient row is inserted ``planned``, then
#: claimed ``sending``, then finalised (docs/campaigns.md).
ROW_WRITES_PER_RECIPIENT = 3
#: A campaign to every contact is sent within this many hours.
CAMPAIGN_HOURS = 1.0
#: WAL per row version, as a multiple of the row's size with its index entries: not measured
#: (checkpoints' full-page images add to it); measure with ``pg_stat_wal``.
WAL_PER_ROW_WRITE = 1.0

SECONDS_PER_DAY = 86_400
MIB = 1024 * 1024


@dataclass(frozen=True)
class Cost:
    """One role's measured CPU per message on one path, and where it comes from."""

    role: str
    path: str
    #: CPU seconds per message; None when no committed run measured it.
    cpu_s: float | None
    source: str
    note: str = ""

    @property
    def per_core(self) -> float | None:
        return 1 / self.cpu_s if self.cpu_s else None


def _latest(scenario: str, root: Path) -> dict[str, Any] | None:
    """The most recent successful run of ``scenario`` among the committed results."""
    good = [d for d in runs(root) if d["scenario"] == scenario and d.get("ok", True)]
    return good[-1] if good else None


def _latest_split(scenario: str, root: Path) -> dict[str, Any] | None:
    """The most recent successful run of ``scenario`` with the roles in processes of their
    own (as deployed), else the most recent successful run."""
    good = [d for d in runs(root) if d["scenario"] == scenario and d.get("ok", True)]
    split = [d for d in good if d.get("params", {}).get("split", True)]
    chosen = split or good
    return chosen[-1] if chosen else None


def _figure(doc: dict[str, Any], name: str) -> float | None:
    for f in doc.get("figures", []):
        if f["name"].strip() == name:
            value = f["value"]
            return float(value) if value is not None else None
    return None


def _source(doc: dict[str, Any]) -> str:
    commit = f"commit `{doc['commit']}`" if doc.get("commit") else "commit not recorded"
    return f"`{doc['scenario']}`, {commit}, {doc['at'][:10]}"


def _sig(v: float) -> str:
    """Three significant figures: what one run on a shared 2-core machine supports."""
    return _fmt(float(f"{v:.3g}"))


def costs(root: Path = RESULTS) -> list[Cost]:
    """Each role's CPU per message from the latest run that measured it."""
    out: list[Cost] = []
    delays = _latest_split("delays", root)
    if delays is not None:
        stored = _figure(delays, "stored by the scheduler")
        delivered = _figure(delays, "delivered, first to last send")
        spread = float(delays.get("params", {}).get("spread") or 0)
        n = float(delays.get("params", {}).get("n") or 0)
        due = n / spread if spread else 0
        rates = (
            f"stored {_fmt(stored or 0)}/s, delivered {_fmt(delivered or 0)}/s "
            f"of {_fmt(due)} due per second"
        )
        path = "single messages, `log` channel"
        split = {
            role: _figure(delays, f"CPU per message, {role}")
            for role in ("scheduler", "dispatch", "rabbitmq", "postgres")
        }
        if split["scheduler"] is not None and split["dispatch"] is not None:
            for role, name, note in (
                ("scheduler", "scheduler", f"its own process; {rates}"),
                ("dispatch", "dispatch", "its own process"),
                ("PostgreSQL", "postgres", "store, claim and finalise of each message"),
                ("RabbitMQ", "rabbitmq", "intake, the delay ladder and the due queue"),
            ):
                us = split[name]
                out.append(
                    Cost(role, path, us / 1e6 if us is not None else None, _source(delays), note)
                )
        else:
            us = _figure(delays, "worker CPU per message")
            out.append(
                Cost(
                    "scheduler + dispatch",
                    path,
                    us / 1e6 if us is not None else None,
                    _source(delays),
                    f"both roles' processes together (the run does not split them); {rates}",
                )
            )
    campaign = _latest("campaign", root)
    if campaign is not None:
        sent = _figure(campaign, "receiver: messages (unique)") or campaign.get("sent")
        rate = _figure(campaign, "recipients per second")
        cpu = {
            f["name"].strip()[4:]: f["value"]
            for f in campaign.get("figures", [])
            if f["name"].strip().startswith("CPU ") and f["value"] is not None
        }
        dispatch = sum(v for k, v in cpu.items() if k.startswith("dispatch"))
        channel = campaign.get("params", {}).get("channel", "?")
        path = f"campaign recipients, `{channel}` channel"
        for role, seconds, note in (
            ("dispatch", dispatch or None, f"{_fmt(rate or 0)} recipients/s on the 2 cores"),
            ("planner", cpu.get("planner"), "keyset pages and a publish per batch"),
            ("PostgreSQL", cpu.get("postgres"), "freeze, claim and finalise of each recipient"),
            ("RabbitMQ", cpu.get("rabbitmq"), "one AMQP message per batch"),
        ):
            per = seconds / sent if seconds and sent else None
            out.append(Cost(role, path, per, _source(campaign), note))
    for file in sorted(root.glob("backends-*.json")):
        doc = json.loads(file.read_text())
        tiers = doc.get("results", {}).get("tiers", {})
        us = tiers.get("broker CPU per message (µs)")
        if us is not None:
            out.append(
                Cost(
                    "RabbitMQ",
                    "single messages through the delay ladder",
                    us / 1e6,
                    _source(doc),
                    f"one node; machine {_fmt(tiers.get('machine CPU busy', 0))} % busy",
                )
            )
    out.append(Cost("events", "contact events", None, "no committed run", "not measured"))
    out.append(Cost("receipts", "read receipts", None, "no committed run", "not measured"))
    return out


def _worst(costs: list[Cost], role: str) -> Cost | None:
    """The most expensive measured path of ``role`` (a role named in a joint figure counts)."""
    mine = [c for c in costs if role in c.role.split(" + ") and c.cpu_s is not None]
    return max(mine, key=lambda c: c.cpu_s or 0) if mine else None


def render(root: Path = RESULTS) -> str:
    """The generated section's Markdown."""
    cs = costs(root)
    average = MESSAGES_PER_DAY / SECONDS_PER_DAY
    peak = average * PEAK_FACTOR
    lines = [
        "### Measured: CPU per message, per role",
        "",
        "| role | path | CPU per message | per core | from | note |",
        "|---|---|---|---|---|---|",
    ]
    for c in cs:
        cpu = f"{_fmt(c.cpu_s * 1e6)} µs" if c.cpu_s else "not measured"
        per = f"{_sig(c.per_core)}/s" if c.per_core else ""
        lines.append(f"| {c.role} | {c.path} | {cpu} | {per} | {c.source} | {c.note} |")
    lines += [
        "",
        "### Assumed",
        "",
        "| assumption | value |",
        "|---|---|",
        f"| contacts | {CONTACTS:,} |",
        f"| messages a day (a campaign recipient counts as one) | {MESSAGES_PER_DAY:,} |",
        f"| peak over the day's average, times | {PEAK_FACTOR:g} |",
        f"| share of its cores a role may use at the peak | {TARGET_UTILISATION:.0%} |",
        f"| replicas of a role, at least | {MIN_REPLICAS} |",
        f"| RabbitMQ nodes | {BROKER_NODES} |",
        f"| a campaign to every contact is sent within | {CAMPAIGN_HOURS:g} h |",
        f"| single messages waiting in the delay ladder at once | {PENDING_IN_LADDER:,} |",
        f"| days of history kept | {RETENTION_DAYS} |",
        f"| row versions written per recipient | {ROW_WRITES_PER_RECIPIENT} |",
        f"| WAL per row version, times the row with its index entries | {WAL_PER_ROW_WRITE:g} |",
        "",
        f"Average {_fmt(average)} messages/s; peak {_fmt(peak)} messages/s.",
        "",
        "### Derived: replicas and cores at the peak",
        "",
        "Each role is sized on its most expensive measured path, as if every message of the day "
        "took it; a worker process runs one event loop, so it uses one core at most.",
        "",
        "| role | sized on | cores busy at the peak | cores with headroom | replicas |",
        "|---|---|---|---|---|",
    ]
    sized: list[float] = []
    for role in ("scheduler", "dispatch", "planner", "events", "receipts"):
        worst = _worst(cs, role)
        if worst is None or worst.cpu_s is None:
            lines.append(f"| {role} | not measured | | | {MIN_REPLICAS} (the floor) |")
            continue
        busy = peak * worst.cpu_s
        cores = busy / TARGET_UTILISATION
        replicas = max(MIN_REPLICAS, math.ceil(cores))
        sized.append(cores)
        lines.append(
            f"| {role} | {worst.role}, {worst.path} | {busy:.2f} | {cores:.2f} | {replicas} |"
        )
    for server, count in (("RabbitMQ", BROKER_NODES), ("PostgreSQL", 1)):
        worst = _worst(cs, server)
        if worst is None or worst.cpu_s is None:
            continue
        busy = peak * worst.cpu_s
        lines.append(
            f"| {server} | {worst.path} | {busy:.2f} | {busy / TARGET_UTILISATION:.2f} | "
            f"{count} node{'s' if count > 1 else ''} |"
        )
    if sized and max(sized) <= MIN_REPLICAS:
        lines += [
            "",
            f"Every measured role fits within the floor of {MIN_REPLICAS} replicas at the peak: "
            "availability, not CPU, sets the worker count.",
        ]
    elif sized:
        lines += ["", "At least one role needs more replicas than the floor for CPU."]
    lines += _broker(root)
    lines += _campaign(root, cs)
    lines += _postgres(root, average, peak)
    return "\n".join(lines)


def _broker(root: Path) -> list[str]:
    """RabbitMQ's memory and disk with :data:`PENDING_IN_LADDER` requests waiting."""
    for path in sorted(root.glob("backends-*.json"), reverse=True):
        doc = json.loads(path.read_text())
        tiers = doc.get("results", {}).get("tiers", {})
        pending = tiers.get("requests pending")
        memory = tiers.get("broker memory added (MB)")
        disk = tiers.get("broker disk added (MB)")
        if not (pending and memory is not None and disk is not None):
            continue
        scale = PENDING_IN_LADDER / pending
        bundled = tiers.get("AMQP messages waiting (bundled)", 0)
        return [
            "",
            f"### Derived: RabbitMQ with {PENDING_IN_LADDER:,} requests waiting",
            "",
            "| figure | measured | at the assumed backlog, per node |",
            "|---|---|---|",
            f"| requests waiting | {pending:,} ({bundled:,} AMQP messages, bundled) | "
            f"{PENDING_IN_LADDER:,} |",
            f"| broker memory added | {_fmt(memory)} MiB | {memory * scale / 1024:,.1f} GiB |",
            f"| broker disk added | {_fmt(disk)} MiB | {disk * scale / 1024:,.1f} GiB |",
            "",
            f"Measured on one node ({_source(doc)}, the `tiers` backend); every member of a "
            "quorum queue keeps its own copy, so each of the nodes is assumed to hold as much.",
        ]
    return []


def _campaign(root: Path, cs: list[Cost]) -> list[str]:
    """A campaign to every contact within :data:`CAMPAIGN_HOURS`: its rate and its cores."""
    campaign = _latest("campaign", root)
    if campaign is None:
        return []
    rate = CONTACTS / (CAMPAIGN_HOURS * 3600)
    freeze = _figure(campaign, "of which start command (freeze)")
    contacts = campaign.get("params", {}).get("contacts")
    lines = [
        "",
        f"### Derived: a campaign to all {CONTACTS:,} contacts within {CAMPAIGN_HOURS:g} h",
        "",
        f"{_fmt(rate)} recipients/s while it sends, on top of the day's other traffic.",
        "",
        "| role | cores busy | cores with headroom |",
        "|---|---|---|",
    ]
    for c in cs:
        if c.path.startswith("campaign") and c.cpu_s is not None:
            busy = rate * c.cpu_s
            lines.append(f"| {c.role} | {busy:.2f} | {busy / TARGET_UTILISATION:.2f} |")
    if freeze is not None and contacts:
        lines += [
            "",
            f"Freezing the audience (one `INSERT … SELECT`, one Postgres core) took "
            f"{_fmt(freeze)} s for {contacts:,} contacts ({_source(campaign)}): "
            f"about {_fmt(freeze * CONTACTS / contacts)} s for {CONTACTS:,}, if it stays "
            "linear.",
        ]
    return lines


def _postgres(root: Path, average: float, peak: float) -> list[str]:
    """Rows, bytes and WAL of ``message_items`` at the assumed volume."""
    campaign = _latest("campaign", root)
    row = _figure(campaign, "message_items per 1M rows (all)") if campaign else None
    if campaign is None or row is None:
        return ["", "`message_items` bytes per row: not measured."]
    row_bytes = row * MIB / 1e6  # the bench reports MiB per million rows
    heap = _figure(campaign, "message_items per 1M rows (heap)")
    heap_bytes = heap * MIB / 1e6 if heap is not None else None
    day = MESSAGES_PER_DAY * row_bytes
    writes = MESSAGES_PER_DAY * ROW_WRITES_PER_RECIPIENT
    wal_day = writes * row_bytes * WAL_PER_ROW_WRITE
    wal_peak = peak * ROW_WRITES_PER_RECIPIENT * row_bytes * WAL_PER_ROW_WRITE
    return [
        "",
        "### Derived: PostgreSQL's `message_items`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| bytes per row, indexes included (heap alone) | {_fmt(row_bytes)} "
        f"({_fmt(heap_bytes or 0)}); from {_source(campaign)} |",
        f"| rows a day | {MESSAGES_PER_DAY:,} |",
        f"| bytes a day | {day / 1e9:.1f} GB |",
        f"| kept ({RETENTION_DAYS} days) | {day * RETENTION_DAYS / 1e9:,.0f} GB |",
        f"| row versions written a day | {writes:,} |",
        f"| dead row versions a day, for vacuum | {writes - MESSAGES_PER_DAY:,} |",
        f"| row versions written a second: average, peak | "
        f"{_fmt(average * ROW_WRITES_PER_RECIPIENT)}, {_fmt(peak * ROW_WRITES_PER_RECIPIENT)} |",
        f"| WAL a day; at the peak | {wal_day / 1e9:.0f} GB; {wal_peak / 1e6:.1f} MB/s |",
    ]
