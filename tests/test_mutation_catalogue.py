"""The mutation lane (bench/mutations.py) cannot go stale: every planted bug still applies.

Running the lane takes minutes, so the README's test command does not run it; it checks instead that
each catalogued mutation's target text is in its file exactly once and that the tests it names
exist. Code that moves under a mutation fails here, not silently in the lane.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "mutations.py"


@pytest.fixture(scope="module")
def lane() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tokentrail_bench_mutations", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_every_catalogued_mutation_applies_exactly_once_and_names_tests_that_exist(lane: ModuleType) -> None:
    assert lane.check(lane.MUTATIONS) == {}
    assert len(lane.MUTATIONS) >= 40


def test_a_mutation_whose_code_moved_is_an_error_not_a_skip(lane: ModuleType) -> None:
    moved = lane.Mutation(
        "moved",
        "proxy/recording/capture.py",
        "code that is not there",
        "anything",
        ("tests/test_capture.py",),
        "a target that moved away",
    )
    twice = lane.Mutation(
        "twice", "proxy/recording/capture.py", "import", "x", ("tests/test_capture.py",), "ambiguous"
    )
    no_test = lane.Mutation(
        "no-test",
        "proxy/recording/capture.py",
        'return ",".join(found) if found else Integrity.OK',
        "return Integrity.OK",
        ("tests/test_capture.py::test_that_does_not_exist", "tests/test_gone.py"),
        "names tests that are not there",
    )
    found = lane.check([moved, twice, no_test])
    assert set(found) == {"moved", "twice", "no-test"}
    assert "0 times" in found["moved"][0]
    assert len(found["no-test"]) == 2
    verdict, seconds = lane.run(moved)  # runs no test, changes no file
    assert verdict.startswith("STALE")
    assert seconds == 0.0


def test_check_exits_non_zero_on_a_stale_catalogue(lane: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lane.main(["--check"]) == 0
    stale = lane.Mutation("stale", "proxy/app.py", "not in app.py", "", ("tests/test_shutdown.py",), "gone")
    monkeypatch.setattr(lane, "MUTATIONS", [*lane.MUTATIONS, stale])
    assert lane.main(["--check"]) == 1
