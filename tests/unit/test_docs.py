"""The docs that describe the code are checked against it, so they cannot drift unnoticed.

The code map in docs/architecture.md lists every package and module of the three packages
(each row's first cell holds backticked paths); docs/tables.md describes every table and
column of the schema and every migration.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Column, create_engine

from workers.recipients import ItemStatus, MessageStatus
from workers.store.schema import metadata

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("producer", "shared", "workers")
#: Listed as one directory: its files are Alembic's environment and one file per migration.
MIGRATIONS = "workers/store/migrations/"
#: Postgres's names for the column types (creating an engine connects to nothing).
POSTGRES = create_engine("postgresql+psycopg://").dialect


def _section(doc: str, heading: str) -> str:
    """The text under ``heading`` (a ``## `` heading) up to the next ``## `` heading."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _first_cells(section: str) -> list[str]:
    """The first cell of every table row of ``section`` (header and rule rows left out)."""
    cells = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells.append(line.split("|")[1].strip())
    return cells


def _code_map_paths() -> list[str]:
    return [
        path
        for cell in _first_cells(_section("architecture.md", "Code map"))
        for path in re.findall(r"`([^`]+)`", cell)
    ]


def _modules() -> set[str]:
    """Every package (as ``dir/``) and module the code map must list."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(MIGRATIONS):
                continue
            if path.name == "__init__.py":
                found.add(f"{path.parent.relative_to(ROOT).as_posix()}/")
            else:
                found.add(relative)
    return found | {MIGRATIONS}


def test_every_path_in_the_code_map_exists() -> None:
    paths = _code_map_paths()
    assert paths, "no code map found in docs/architecture.md"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"the code map names paths that do not exist: {missing}"
    assert len(paths) == len(set(paths)), "a path is listed twice in the code map"


def test_every_package_and_module_is_in_the_code_map() -> None:
    unlisted = sorted(_modules() - set(_code_map_paths()))
    assert unlisted == [], (
        f"add a line for each to the code map in docs/architecture.md: {unlisted}"
    )


def _tables_doc() -> dict[str, dict[str, tuple[str, str]]]:
    """docs/tables.md: for each ``## `name` `` section, its column rows as
    ``{column: (type, null)}``."""
    text = (ROOT / "docs" / "tables.md").read_text(encoding="utf-8")
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for match in re.finditer(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        columns = {}
        body = match.group(2).split("\n### ")[0]  # the status tables follow the columns
        for line in body.splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
                columns[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
        tables[match.group(1)] = columns
    return tables


def _type(column: Column[object]) -> str:
    """The column's type as the page writes it: Postgres's own name, lower case."""
    compiled = column.type.compile(dialect=POSTGRES).lower()
    return {"timestamp with time zone": "timestamptz", "float": "double precision"}.get(
        compiled, compiled
    )


def test_the_tables_page_describes_every_table_and_column_of_the_schema() -> None:
    documented = _tables_doc()
    assert sorted(documented) == sorted(metadata.tables), (
        "docs/tables.md needs a `## `table`` section per table, and no other"
    )
    for name, table in metadata.tables.items():
        expected = {
            c.name: (_type(c), "no" if not c.nullable or c.primary_key else "yes")
            for c in table.columns
        }
        assert documented[name] == expected, f"docs/tables.md, table {name}"


def test_the_tables_page_lists_every_status() -> None:
    items = _section("tables.md", "`message_items`")
    for status in ItemStatus:
        assert f"| `{status.value}` |" in items, f"message_items.status {status.value}"
    messages = _section("tables.md", "`messages`")
    for code in MessageStatus:
        assert f"| {code.value} | `{code.name.lower()}` |" in messages, f"messages.status {code}"


def test_the_tables_page_lists_every_migration() -> None:
    listed = re.findall(r"^\| `(\d{4})` \|", _section("tables.md", "Migrations"), re.M)
    files = sorted(p.name[:4] for p in (ROOT / MIGRATIONS / "versions").glob("[0-9]*.py"))
    assert listed == files


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # no headings in code blocks
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_link_between_the_docs_leads_somewhere() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            missing = not linked.exists()
            unanchored = (
                not missing
                and bool(anchor)
                and (linked.suffix != ".md" or anchor not in _anchors(linked))
            )
            if missing or unanchored:
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_every_repository_path_the_docs_name_exists() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    top = "producer|shared|workers|tests|bench|infra|examples"  # docs/: the link test
    named = {
        (page.name, path)
        for page in pages
        for path in re.findall(rf"`((?:{top})/[\w./-]*)`", page.read_text(encoding="utf-8"))
    }
    assert sorted(named) != []
    assert sorted((page, path) for page, path in named if not (ROOT / path).exists()) == []
