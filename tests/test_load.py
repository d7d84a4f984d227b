"""Load in `make test`: 16 concurrent clients (gradio_client and plain HTTP, mixed) against one server process with
tiny-demo, through benchmarks/load.py (the benchmark runs 64). Every request ends with its images or a clear "busy"
refusal, the gallery gains exactly the rows returned (each with its file), and the server's memory stays within 10%."""

from pathlib import Path

import pytest

from benchmarks import load


@pytest.mark.slow
def test_sixteen_mixed_clients_lose_nothing_and_leave_memory_flat(tmp_path: Path) -> None:
    report = load.run(tmp_path, clients=16, requests=2)
    assert report["outcomes"]["error"] == 0, report["errors"]
    assert report["outcomes"]["images"] + report["outcomes"]["busy"] == 32
    assert (
        report["outcomes_by_kind"]["http"]["images"] > 0 and report["outcomes_by_kind"]["gradio_client"]["images"] > 0
    )
    gallery = report["gallery"]
    assert gallery["rows_added"] == gallery["images_returned"] == report["outcomes"]["images"]
    assert gallery["duplicated_ids"] == gallery["lost_rows"] == gallery["rows_without_file"] == 0
    assert abs(report["memory"]["growth_pct"]) <= 10, report["memory"]
    assert report["pending_after"] == 0 and report["ok"]
