"""The benchmark record: a file per run with its load and state, and docs generated from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import capacity, report, scaling, table


def test_the_tables_in_docs_benchmarks_are_what_the_committed_results_give() -> None:
    assert table.section(table.DOC.read_text()) == table.render(), (
        "docs/benchmarks.md is stale: run `python -m bench table`"
    )


def test_the_sizing_model_in_docs_scaling_is_what_the_committed_results_give() -> None:
    assert table.section(scaling.DOC.read_text(), "scaling.md") == scaling.render(), (
        "docs/scaling.md is stale: run `python -m bench table`"
    )


def test_each_run_writes_a_file_of_its_own_with_commit_dirty_flag_load_and_outcome(
    tmp_path: Path,
) -> None:
    report.begin()
    figures = [
        report.Figure("lateness p99", 42.0, "ms", 100, "<="),
        report.Figure("sends after pause returned", None, "", 10, "<=", absent="no pause"),
    ]
    first = report.write("demo", {"n": 1}, {}, {}, figures, {}, ok=False, root=tmp_path)
    doc = json.loads(first.read_text())
    assert first.parent == tmp_path / "demo"
    assert first.name.endswith(f"-{doc['commit']}.json")
    assert isinstance(doc["dirty"], bool)
    assert doc["ok"] is False
    assert 0 <= doc["load"]["before"]["cpu_busy"] <= 1
    assert len(doc["load"]["before"]["loadavg"]) == 3
    assert doc["load"]["loaded_machine"] == (doc["load"]["before"]["cpu_busy"] >= 0.25)
    absent = doc["figures"][1]
    assert (absent["value"], absent["absent"], absent["met"]) == (None, "no pause", None)
    assert "no pause" in report.table(figures)


def test_a_failed_run_is_counted_not_averaged_and_a_missing_value_is_not_a_zero(
    tmp_path: Path,
) -> None:
    def run(at: str, ok: bool, p99: float, sends: float | None) -> None:
        (tmp_path / "demo").mkdir(exist_ok=True)
        doc = {
            "scenario": "demo",
            "at": at,
            "commit": "abc1234",
            "ok": ok,
            "params": {"n": 1},
            "figures": [
                {"name": "p99", "value": p99, "unit": "ms", "target": None, "bound": ">="},
                {"name": "sends", "value": sends, "unit": "", "target": None, "bound": ">="},
            ],
        }
        (tmp_path / "demo" / f"{at}.json").write_text(json.dumps(doc))

    run("2026-01-01T00:00:01", True, 10, None)
    run("2026-01-01T00:00:02", True, 30, 5)
    run("2026-01-01T00:00:03", False, 9000, 0)
    text = table.render(tmp_path)
    assert "2 run(s) succeeded, 1 failed" in text
    assert "| p99 | 20 ms (10 to 30) |" in text
    assert "| sends | 5; 1 run(s) without |" in text


def test_the_sizing_model_sizes_each_role_on_its_latest_successful_run_and_floors_the_rest(
    tmp_path: Path,
) -> None:
    def run(at: str, ok: bool, cpu_us: float) -> None:
        (tmp_path / "delays").mkdir(exist_ok=True)
        doc = {
            "scenario": "delays",
            "at": at,
            "commit": "abc1234",
            "ok": ok,
            "params": {"n": 1},
            "figures": [
                {"name": "worker CPU per message", "value": cpu_us, "unit": "µs"},
                {"name": "stored by the scheduler", "value": 4000, "unit": "/s"},
                {"name": "delivered, first to last send", "value": 2000, "unit": "/s"},
            ],
        }
        (tmp_path / "delays" / f"{at}.json").write_text(json.dumps(doc))

    run("2026-01-01T00:00:01", True, 100)
    run("2026-01-02T00:00:01", True, 2000)  # the latest successful run: sized on it
    run("2026-01-03T00:00:01", False, 1)
    text = scaling.render(tmp_path)
    peak = scaling.MESSAGES_PER_DAY / 86_400 * scaling.PEAK_FACTOR
    cores = peak * 2000e-6 / scaling.TARGET_UTILISATION
    assert "`delays`, commit `abc1234`, 2026-01-02" in text
    assert f"| {cores:.2f} | {math.ceil(cores)} |" in text
    assert cores > scaling.MIN_REPLICAS
    assert "At least one role needs more replicas than the floor for CPU." in text
    assert f"| events | not measured | | | {scaling.MIN_REPLICAS} (the floor) |" in text
    assert "`message_items` bytes per row: not measured." in text


def _step(rate: int, p99: float, busiest: dict[str, float], ok: bool = True) -> capacity.Step:
    figures = [report.Figure("lateness p99", p99, "ms"), report.Figure("machine CPU busy", 90, "%")]
    figures += [report.Figure(f"  busiest second, {k}", v, "%") for k, v in busiest.items()]
    return capacity.Step(rate, figures, ok)


def test_the_capacity_summary_names_where_p99_crosses_and_the_first_process_to_saturate() -> None:
    steps = [
        _step(1000, 20, {"scheduler": 40, "dispatch": 30, "postgres": 50}),
        _step(2000, 60, {"scheduler": 85, "dispatch": 50, "postgres": 150}),
        _step(3000, 400, {"scheduler": 97, "dispatch": 70, "postgres": 170}),
        _step(4000, 900, {"scheduler": 99, "dispatch": 95, "postgres": 190}),
    ]
    figures, lines = capacity.summary(steps, cores=2)
    assert [f.value for f in figures] == [2000, 3000, 3000]
    assert lines[0] == "p99 crosses 100 ms between 2000 and 3000 due per second"
    # Postgres at 170 % is 85 % of two cores: the scheduler, alone on its one core, is first.
    assert lines[1].startswith("first to saturate: scheduler, at 3000 /s")


def test_a_capacity_step_that_failed_counts_as_beyond_the_target_whatever_its_p99() -> None:
    steps = [_step(1000, 20, {"dispatch": 10}), _step(2000, 30, {"dispatch": 20}, ok=False)]
    figures, lines = capacity.summary(steps, cores=2)
    assert [f.value for f in figures] == [1000, 2000, None]
    assert lines[1].startswith("no process reached 90% of its ceiling in any second")
    assert "the machine was 90 % busy (at 2000 /s)" in lines[1]  # the box was the limit
