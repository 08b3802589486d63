"""Fixtures many test files share. (The rank start-up they share, `tiny_rank`, runs in worker
processes outside pytest, so it sits in tests/multiproc.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from k2train.data.prepare import prepare_dataset

    # A fixed text (the standard library's json package), so the comparison does not shift with
    # every change to this repository's own files.
    import json

    out = tmp_path_factory.mktemp("data") / "sources"
    prepare_dataset(sorted(Path(json.__file__).parent.glob("*.py")), out, "byte")
    return str(out)


@pytest.fixture(scope="session")
def plain_runs() -> dict:
    """Multi-process runs of test_parallel_training.run_steps by their overrides, shared by the tests
    that compare against the same plain run (test_parallel_training.plain_run). Every module's `data`
    is the same corpus, so a run made with one module's copy stands for another's."""
    return {}
