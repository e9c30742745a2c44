"""The pure parts of ``copydet dedupe``: unordered pairs, two-hop scores, groups, keep rule,
outputs, ids that are file names."""

from __future__ import annotations

import json
from pathlib import Path

from common.images import list_images
from common.io import read_csv, write_csv
from dedupe.groups import ImageInfo, make_groups, write_outputs
from dedupe.pairs import best_rows, identical_files, two_hop, unordered_candidates


def test_each_unordered_pair_is_one_row_with_the_smaller_id_first(tmp_path: Path) -> None:
    found = tmp_path / "search" / "s-vs-s" / "candidates.csv"
    write_csv(found, ["query_id", "view", "reference_id", "votes", "rank"], [
        ("b", "orig", "a", "3.0", 0), ("a", "orig", "b", "5.0", 0), ("a", "orig", "a", "9", 0),
        ("b", "mirror", "a", "1.0", 1), ("c", "orig", "a", "2.0", 0)])
    rows = read_csv(unordered_candidates(found))
    assert [(r["query_id"], r["reference_id"], r["view"], r["votes"]) for r in rows] == [
        ("a", "b", "mirror", "1.0"), ("a", "b", "orig", "5.0"), ("a", "c", "orig", "2.0")]
    assert best_rows([{"query_id": "x", "reference_id": "x", "s": "1"}], "s") == []


def test_each_image_keeps_its_best_candidates_over_both_views(tmp_path: Path) -> None:
    found = tmp_path / "search" / "s-vs-s" / "candidates.csv"
    write_csv(found, ["query_id", "view", "reference_id", "votes", "rank"], [
        ("a", "orig", "b", "9.0", 0), ("a", "orig", "c", "1.0", 1), ("a", "mirror", "d", "4.0", 0),
        ("a", "mirror", "e", "0.5", 1), ("b", "orig", "c", "0.2", 0), ("d", "orig", "e", "3", 0)])
    two = unordered_candidates(found, per_image=2)
    assert two.parent.name == "s-vs-s-unordered-top2"  # beside the list of all
    assert [(r["query_id"], r["reference_id"], r["view"]) for r in read_csv(two)] == [
        ("a", "b", "orig"), ("a", "d", "mirror"), ("b", "c", "orig"), ("d", "e", "orig")]
    assert len(read_csv(unordered_candidates(found))) == 6


def test_two_hop_scores_copies_of_one_image_by_their_weaker_link() -> None:
    scores = {("a", "c"): 0.9, ("b", "c"): 0.6, ("c", "d"): 0.005, ("a", "b"): 0.1}
    assert two_hop(scores) == {("a", "b"): 0.6}  # d's link is under the floor


def chain(n: int) -> list[tuple[str, str, float]]:
    """Look-alikes in a row: each matches the next, none the one after."""
    return [(f"L{i}", f"L{i + 1}", 0.8) for i in range(n - 1)]


def test_star_groups_do_not_grow_along_a_chain_that_components_merge() -> None:
    pairs = chain(7)
    assert [len(g) for g in make_groups(pairs, 0.5, {}, "components")] == [7]
    star = make_groups(pairs, 0.5, {}, "star")
    assert max(map(len, star)) <= 3 and sum(map(len, star)) <= 7
    pairs_abc = [("A", "B", 0.9), ("B", "C", 0.9)]  # A~B~C, A≁C: one group through B
    assert make_groups(pairs_abc, 0.5, {}, "star") == [["A", "B", "C"]]
    assert make_groups(pairs_abc, 0.95, {}, "star") == []


def test_the_kept_image_has_the_most_pixels_then_the_largest_file_then_the_first_name() -> None:
    info = {"a": ImageInfo(100, 10), "b": ImageInfo(400, 5), "c": ImageInfo(400, 9),
            "d": ImageInfo(400, 9)}
    groups = make_groups([("a", "b", 0.9), ("a", "c", 0.9), ("a", "d", 0.9)], 0.5, info)
    assert groups == [["c", "d", "b", "a"]]


def test_outputs_list_every_image_and_remove_all_but_one_per_group(tmp_path: Path) -> None:
    write_outputs(tmp_path, ["a", "b", "c", "d"], [["b", "a", "d"]])
    assert read_csv(tmp_path / "groups.csv") == [
        {"image": "b", "group": "G00001", "keep": "1"},
        {"image": "a", "group": "G00001", "keep": "0"},
        {"image": "d", "group": "G00001", "keep": "0"}]
    assert json.loads((tmp_path / "duplicates.json").read_text()) == {
        "a": ["b", "d"], "b": ["a", "d"], "c": [], "d": ["b", "a"]}
    assert (tmp_path / "keep.txt").read_text().split() == ["b", "c"]
    assert (tmp_path / "remove.txt").read_text().split() == ["a", "d"]


def test_ids_are_file_names_so_one_stem_in_two_formats_is_two_images(tmp_path: Path) -> None:
    formats = [f"ukbench09380.{s}" for s in ("jpg", "jpeg", "png", "bmp", "webp")]
    for name in formats:  # imagededup's test images, which stop `run` (one stem)
        (tmp_path / "uk").mkdir(exist_ok=True)
        (tmp_path / "uk" / name).write_bytes(name.encode())
    assert list_images(tmp_path / "uk", ids="name").ids == tuple(sorted(formats))
    for name in ("a.jpg", "a.png", "sub/a.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    names = list_images(tmp_path, ids="name")
    assert [i for i in names.ids if not i.startswith("uk/")] == ["a.jpg", "a.png", "sub/a.jpg"]
    sub = tmp_path / "sub"  # one folder listed with other ids: other outputs
    assert list_images(sub, ids="name").key != list_images(sub).key
    (tmp_path / "b.jpg").write_bytes(b"a.jpg")
    ids, paths = (*names.ids, "b.jpg"), (*names.paths, tmp_path / "b.jpg")
    assert identical_files(ids, paths) == [("a.jpg", "b.jpg")]  # byte-identical: one group


def test_a_folder_keeps_its_outputs_name_when_its_images_change(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"a")
    keys = [list_images(tmp_path).key, list_images(tmp_path, ids="name").key]
    (tmp_path / "b.jpg").write_bytes(b"b")
    assert [list_images(tmp_path).key, list_images(tmp_path, ids="name").key] == keys
    assert list_images(tmp_path, ids="name").id_kind == "name"


def test_two_framed_images_whose_crops_match_nothing_share_only_the_frame() -> None:
    import numpy as np

    from dedupe.pairs import frame_gate
    from merge.features import PairTable

    pairs = [("a", "b"), ("a", "c"), ("c", "d")]
    x = np.array([[5.0, -12.0], [5.0, -12.0], [5.0, 4.0]])  # local_logit, crop_local_logit
    table = PairTable(pairs, ["local_logit", "crop_local_logit"], x, ["local"] * 3)
    scores = frame_gate(table, np.array([0.99, 0.99, 0.99]), framed={"a", "b", "c", "d"} - {"c"})
    assert scores[0] < 1e-4  # both framed, crops match nothing: the frame alone
    assert scores[1] == 0.99  # c is not framed
    scores = frame_gate(table, np.array([0.99, 0.99, 0.99]), framed={"c", "d"})
    assert scores[2] == 0.99  # framed, but the crops match
