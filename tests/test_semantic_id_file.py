"""dataset/semantic_ids.py: reading and writing semantic_id_dict.json."""
from __future__ import annotations

import json

import pytest

from dataset import CorruptSemanticIdFile, load_semantic_ids, save_semantic_ids


def test_semantic_id_file_int_keys_and_invalid_entries(tmp_path):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text(json.dumps({"123": [1, 2, 3, 4], "x": [1, 2, 3, 4], "5": [1, 2, 3], "6": [1, 2, 3, 256],
                             "7": [0, 0, 0, 255], "8": "abc"}))
    sids, invalid = load_semantic_ids(p)
    assert sids == {123: [1, 2, 3, 4], 7: [0, 0, 0, 255]} and invalid == 4
    save_semantic_ids(p, sids)
    assert json.loads(p.read_text()) == {"7": [0, 0, 0, 255], "123": [1, 2, 3, 4]}


@pytest.mark.parametrize("content", ["", "   ", '{"1": [1, 2, 3, 4], "2": [1,', "[1, 2]"])
def test_empty_or_truncated_semantic_id_file_is_corrupt(tmp_path, content):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text(content)
    with pytest.raises(CorruptSemanticIdFile):
        load_semantic_ids(p)


def test_semantic_id_file_with_huge_keys_or_deep_nesting(tmp_path):
    p = tmp_path / "semantic_id_dict.json"
    p.write_text('{"99999999999999999999999": [1, 2, 3, 4], "5": [1, 2, 3, 4]}')
    ids, invalid = load_semantic_ids(p)
    assert ids == {5: [1, 2, 3, 4]} and invalid == 1
    p.write_text("[" * 100_000 + "]" * 100_000)
    from dataset import CorruptSemanticIdFile

    with pytest.raises(CorruptSemanticIdFile, match="RecursionError"):
        load_semantic_ids(p)
