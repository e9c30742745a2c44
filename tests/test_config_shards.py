"""Configuration overrides and names, the shard store, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common import UserError
from common.config import load_config, output_name
from common.images import list_images
from common.io import atomic_path, write_csv
from common.shards import ShardStore, StoreMismatchError, pack, unpack


def test_overrides_parse_yaml_and_reject_unknown_keys(tmp_path: Path) -> None:
    conf = load_config(overrides=["local_fea.short_side=400", "local_search.gpu=false"])
    assert conf["local_fea"]["short_side"] == 400 and conf["local_search"]["gpu"] is False
    user = tmp_path / "my.yaml"
    user.write_text("local_search:\n  candidates: 9\n")
    assert load_config(user)["local_search"]["candidates"] == 9
    assert load_config(user)["local_search"]["k"] == 10  # other keys keep their defaults
    with pytest.raises(UserError, match="unknown key 'shortside'"):
        load_config(overrides=["local_fea.shortside=400"])
    with pytest.raises(UserError, match=r"section\.key=value"):
        load_config(overrides=["local_fea.short_side"])


def test_output_names_encode_parameters_and_upstream() -> None:
    conf = load_config()["local_fea"]
    name = output_name(conf)
    assert name.startswith("rootsift-s300-k1000-")
    assert output_name({**conf, "contrast_threshold": 0.03}) != name  # not in label, in hash
    assert output_name({**conf, "short_side": 400}).startswith("rootsift-s400-")
    assert output_name(conf, "upstream-a") != output_name(conf, "upstream-b")
    assert output_name(conf) == name  # stable


def test_store_plan_extends_and_locates(photos: Path, tmp_path: Path) -> None:
    images = list_images(photos)
    store = ShardStore.plan(tmp_path / "store", images, shard_size=4)
    assert [len(s) for s in store.shards] == [4, 2] and len(store) == 6
    assert store.locate(images.ids[5]) == (1, 1)
    assert store.id_of(store.number(images.ids[5])) == images.ids[5]
    assert store.missing() == [0, 1]
    # new images go to new shards; old ids keep their place
    shutil.copy(images.paths[0], photos / "zz_new.jpg")
    bigger = ShardStore.plan(tmp_path / "store", list_images(photos), shard_size=99)
    assert bigger.shard_size == 4 and bigger.shards[:2] == store.shards
    assert bigger.shards[2] == ["zz_new"]
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["shards"][2] == [
        "zz_new"]


def test_store_refuses_another_folder(photos: Path, tmp_path: Path) -> None:
    ShardStore.plan(tmp_path / "store", list_images(photos), 4)
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    with pytest.raises(StoreMismatchError, match="use another work folder"):
        ShardStore.plan(tmp_path / "store", list_images(other), 4)


def test_pack_unpack_round_trip() -> None:
    arrays = [np.arange(6).reshape(3, 2), np.zeros((0, 2)), np.ones((1, 2))]
    packed = pack(arrays, np.float32, 2)
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(unpack(packed, i), a)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_csv(target, ["a"], [[1]])
    assert target.read_text() == "a\n1\n"


def test_shipped_assets_are_found_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    """The installed ``copydet`` runs from anywhere: the configuration's relative asset paths
    resolve into the repository (the trained index was looked up from the current folder)."""
    from common.config import REPO_ROOT, file_digest, repo_path
    from local_fea.index import AUTO_INDEXES, concrete_index, trained_index_path

    monkeypatch.chdir(tmp_path)
    conf = load_config()
    for n_references in (1, *(a.max_references + 1 for a in AUTO_INDEXES[:-1])):  # each one
        section = concrete_index(conf["local_search"], n_references)
        trained = trained_index_path(section, "rootsift-s300-k1000-x")
        assert trained.is_file() and trained.is_relative_to(REPO_ROOT)
    assert file_digest(conf["preprocess"]["weights"]) != "missing"
    (tmp_path / "mine.json").write_text("{}")
    assert repo_path("mine.json") == Path("mine.json")  # a file of the user's, from here
