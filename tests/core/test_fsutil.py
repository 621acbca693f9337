"""Crash-safe JSON writes: the streamed-list writer gives the same document as `json.dumps`, and a killed write
leaves the old file."""

from __future__ import annotations

import json

import pytest

from anime_role_detect import fsutil
from anime_role_detect.fsutil import atomic_write_json, atomic_write_json_with_list


@pytest.mark.parametrize("n,batch", [(0, 10), (1, 10), (25, 10), (20, 10)])
def test_streamed_list_writes_the_same_document_as_json(tmp_path, n, batch):
    head = {"format": 1, "nested": {"a": [1, 2], "é": None}, "empty": {}, "text": "line\nbreak"}
    items = [{"id": i, "source": f"c/{i}.png"} for i in range(n)]
    atomic_write_json_with_list(tmp_path / "g.json", head, "rows", iter(items), batch=batch)
    assert json.loads((tmp_path / "g.json").read_text(encoding="utf-8")) == {**head, "rows": items}


def test_a_write_killed_mid_list_keeps_the_old_file(tmp_path):
    atomic_write_json(tmp_path / "g.json", {"rows": [1]})

    def rows():
        yield {"id": 0}
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        atomic_write_json_with_list(tmp_path / "g.json", {}, "rows", rows(), batch=1)
    assert json.loads((tmp_path / "g.json").read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # no temporary file left
    assert fsutil.read_json(tmp_path / "g.json") == {"rows": [1]}
