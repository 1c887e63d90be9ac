"""The one way mmqa writes files and folders (mmqa/atomic.py): the old version or the new one, never half."""

from __future__ import annotations

import pytest

from mmqa.atomic import atomic_dir, atomic_file, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "1"
    with atomic_dir(final) as tmp:  # replace=True: the new folder takes the old one's place
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    with atomic_dir(final, replace=False) as tmp:  # another writer finished first: its copy stays
        (tmp / "c.txt").write_text("4")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporaries left
