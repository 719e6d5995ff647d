from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    marker = request.node.get_closest_marker("fleet")
    kwargs = dict(marker.kwargs) if marker else {}
    f = Fleet(workdir=tmp_path, **kwargs).start()
    yield f
    f.stop()
