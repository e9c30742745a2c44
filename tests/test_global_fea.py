"""Global descriptors: offline weights, checkpoints, ISC h5 layout, resumption, search."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from common import UserError
from common.config import REPO_ROOT, load_config
from global_fea import codec, extract, runtime, search, weights, whiten
from global_fea.model import GlobalDescriptor, ModelConf
from tests.conftest import DATA, demo_references

CAT = DATA / "referenceimages" / "R000019.jpg"  # scikit-image's "chelsea" (CC0)
IMAGENET_CATS = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat


def test_imagenet_checkpoint_matches_timm_tensor_by_tensor() -> None:
    source = weights.read_state_dict(weights.imagenet_checkpoint())
    own = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(own) == 296
    assert [tuple(v.shape) for v in source.values()] == [tuple(v.shape) for v in own.values()]


def test_imagenet_weights_classify_a_cat_as_a_cat() -> None:
    conf = ModelConf(image_size=224)
    model = weights.load_weights(GlobalDescriptor(conf), weights.IMAGENET)
    source = weights.read_state_dict(weights.imagenet_checkpoint())
    image = extract.load_square(str(CAT), 224, 10**8)
    x = model.preprocess(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
    with torch.inference_mode():
        pooled = model.backbone.forward_features(x).mean(dim=(2, 3))
        logits = F.linear(pooled, source["_fc.weight"], source["_fc.bias"])
    assert int(logits.argmax()) in IMAGENET_CATS
    assert float(logits.softmax(1)[0, list(IMAGENET_CATS)].sum()) > 0.5


def test_export_round_trip_gives_the_same_descriptors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    conf = ModelConf(proj_dim=32, image_size=64)
    model = GlobalDescriptor(conf).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    for half, tol in ((False, 1e-6), (True, 2e-3)):
        path = weights.save(model, tmp_path / f"d{half}.safetensors", half=half)
        loaded = weights.load_weights(GlobalDescriptor(conf), str(path))
        with torch.inference_mode():
            assert torch.allclose(loaded(x), expected, atol=tol)
    with pytest.raises(UserError, match="proj_dim"):
        weights.load_weights(GlobalDescriptor(ModelConf(proj_dim=16)), str(path))


def test_timm_state_dict_loads_wrapped_and_names_bad_keys(tmp_path: Path) -> None:
    timm_model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    state = {f"module.{k}": v for k, v in timm_model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "timm.pth")
    model = weights.load_weights(GlobalDescriptor(ModelConf()), str(tmp_path / "timm.pth"))
    assert torch.equal(model.backbone.conv_stem.weight, timm_model.conv_stem.weight)

    state = dict(timm_model.state_dict())
    state.pop("bn2.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"missing keys: bn2\.weight.*unexpected keys: extra"):
        weights.load_weights(GlobalDescriptor(ModelConf()), str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="not found"):
        weights.load_weights(GlobalDescriptor(ModelConf()), str(tmp_path / "none.pth"))


def _original_swin_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> the original Swin/EsViT layout (downsample at the end of a stage)."""
    import re

    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample",
                   lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    return out


@pytest.mark.slow
def test_swin_b_esvit_teacher_checkpoint_loads(tmp_path: Path) -> None:
    conf = ModelConf(arch="swin_base_patch4_window7_224", pool="avg", proj_dim=0,
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    reference = GlobalDescriptor(conf)
    teacher = {f"module.backbone.{k}": v
               for k, v in _original_swin_layout(reference.backbone.state_dict()).items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 1024)  # the DINO head: ignored
    torch.save({"teacher": teacher, "epoch": 300}, tmp_path / "esvit.pth")
    model = weights.load_weights(GlobalDescriptor(conf), str(tmp_path / "esvit.pth"))
    (tmp_path / "esvit.pth").unlink()  # 330 MB: not kept for the rest of the run
    for (k, v), w in zip(reference.backbone.state_dict().items(),
                         model.backbone.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1024)


@pytest.fixture
def gconf(tmp_path: Path) -> dict:
    """Small images, tiny whitening trained in a temporary assets folder."""
    return load_config(overrides=[
        "run.shard_size=4", "run.n_jobs=2", "global_fea.image_size=96",
        "global_fea.whitening=PCAW8,L2norm", f"global_fea.assets={tmp_path / 'assets'}",
        "global_fea.workers=0", "global_fea.batch_size=5"])


def _folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    train, refs, queries = (tmp_path / n for n in ("train", "refs", "queries"))
    photos = demo_references()
    for folder, chosen in ((train, photos[20:36]), (refs, photos[:7])):
        folder.mkdir()
        for p in chosen:
            shutil.copy(p, folder / p.name)
    queries.mkdir()
    for name in ("Q00000", "Q00001", "Q00002", "Q00003", "Q00004"):
        shutil.copy(DATA / "queryimages" / f"{name}.jpg", queries / f"{name}.jpg")
    (queries / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return train, refs, queries


def test_h5_is_readable_by_plain_h5py_in_the_isc_layout(tmp_path: Path, gconf) -> None:
    train, refs, queries = _folders(tmp_path)
    with pytest.raises(UserError, match="make global-assets") as missing:
        extract.main(gconf, queries, refs, tmp_path / "work")
    assert "fit part" in str(missing.value)  # never all training photos: calib stays unseen
    target = re.search(r"`make ([\w-]+)`", str(missing.value)).group(1)
    assert re.search(rf"^{target}:", (REPO_ROOT / "Makefile").read_text(), re.M)
    whiten.main(gconf, train, tmp_path / "work")
    assert codec.bank_path(gconf["global_fea"]).exists()
    h5 = extract.main(gconf, queries, refs, tmp_path / "work")
    with h5py.File(h5, "r") as f:
        assert {"query", "reference", "query_ids", "reference_ids"} <= set(f)
        q_ids = [i.decode() for i in f["query_ids"][:]]
        r_ids = [i.decode() for i in f["reference_ids"][:]]
        assert q_ids == ["Q00000", "Q00001", "Q00002", "Q00003", "Q00004"]  # broken skipped
        assert r_ids == sorted(p.stem for p in refs.iterdir())
        for name, n in (("query", 5), ("query_mirror", 5), ("reference", 7)):
            x = f[name][:]
            assert x.dtype == np.float32 and x.shape == (n, 8)
            assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    (store,) = extract.model_root(gconf, tmp_path / "work").glob("queries-*")
    assert "broken" in (store / "skipped.csv").read_text()


def test_extraction_resumes_a_lost_shard_identically(tmp_path: Path, gconf) -> None:
    _, refs, _ = _folders(tmp_path)
    root = extract.extract_set(gconf, refs, tmp_path / "work")
    first = {p.name: np.asarray(__import__("joblib").load(p)["desc"])
             for p in sorted(root.glob("shard_*.pkl"))}
    assert len(first) == 2
    lost = root / "shard_00001.pkl"
    lost.unlink()
    extract.extract_set(gconf, refs, tmp_path / "work")
    assert lost.exists()
    assert np.allclose(__import__("joblib").load(lost)["desc"], first[lost.name], atol=1e-6)


def test_normalisation_pushes_down_queries_close_to_training_photos() -> None:
    bank = np.eye(4, dtype=np.float32)[:2]  # two training photos: e0, e1
    generic = np.array([[0.8, 0.6, 0.0, 0.0]], np.float32)  # near both training photos
    distinct = np.array([[0.0, 0.0, 0.6, 0.8]], np.float32)  # near none
    offsets = search.norm_offsets(np.vstack([generic, distinct]), bank, 2, 1.0, gpu=False)
    assert np.allclose(offsets, [0.7, 0.0])
    # both queries are at similarity 0.9 to their best reference; after normalisation the
    # distinctive one ranks first, and each query keeps its best view
    hits = {"orig": (np.array([[0.9, 0.5], [0.9, 0.1]]), np.array([[0, 1], [2, 3]]), offsets),
            "mirror": (np.array([[0.95, 0.2], [0.3, 0.2]]), np.array([[1, 0], [2, 3]]),
                       offsets)}
    rows = search.best_per_pair(np.array([0, 1]), hits, k=2)
    by_pair = {(q, r): (view, sim, norm, rank) for q, r, view, sim, norm, rank in rows}
    assert by_pair[(0, 1)][0] == "mirror" and by_pair[(0, 1)][3] == 0
    assert by_pair[(0, 0)][3] == 1
    assert by_pair[(1, 2)][2] > by_pair[(0, 1)][2]
    assert search.norm_offsets(generic, bank, 2, 0.0, gpu=False).tolist() == [0.0]


def test_onnx_runtime_gives_the_torch_descriptors_of_real_images(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    section = {**load_config()["global_fea"], "runtime": "onnx", "device": "cpu"}
    model = weights.build(section)
    paths = [str(p) for p in demo_references()[:6]]
    size = section["image_size"]  # the exported network's input size
    images = torch.from_numpy(np.stack([extract.load_square(p, size, 10**8) for p in paths])
                              .transpose(0, 3, 1, 2).copy())
    expected, expected_flip = extract.describe_batch(model, images, True, torch.device("cpu"))
    onnx = runtime.OnnxDescriptor(model, tmp_path, threads=1)
    (exported,) = tmp_path.glob("network-*.onnx")
    got, got_flip = extract.describe_batch(onnx, images, True, torch.device("cpu"))
    for a, b in ((got, expected), (got_flip, expected_flip)):
        assert a.shape == b.shape == (6, model.dim)
        assert (a * b).sum(1).min() > 0.9999  # unit vectors: cosine
    assert not np.allclose(got, got_flip, atol=1e-3)  # the mirror view is its own input
    again = runtime.OnnxDescriptor(model, tmp_path, threads=1)  # the exported file is reused
    assert exported.stat().st_mtime_ns == next(tmp_path.glob("network-*.onnx")).stat().st_mtime_ns
    assert np.array_equal(extract.describe_batch(again, images, False, torch.device("cpu"))[0],
                          got)


def test_threads_calling_onnx_sessions_describe_as_one_caller(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    section = {**load_config()["global_fea"], "image_size": 64, "batch_size": 2}
    model = GlobalDescriptor(ModelConf(image_size=64)).eval()
    callers = runtime.cpu_callers(model, section, tmp_path, 3)
    def threads(callers: list) -> list[int]:
        return [c.session.get_session_options().intra_op_num_threads for c in callers]

    assert threads(callers) == [1, 1, 1]  # one session per calling thread
    assert len({id(c.session) for c in callers}) == 3 and len(list(tmp_path.glob("*.onnx"))) == 1
    # more cores than callers: the cores are shared out, the callers capped
    assert threads(runtime.cpu_callers(model, section, tmp_path, 6)) == [2, 2, 1, 1]
    assert runtime.cpu_callers(model, {**section, "runtime": "torch"}, tmp_path, 3) == [model]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(CAT.read_bytes()[:300])
    paths = [str(p) for p in demo_references()[:4]] + [str(broken)] + [str(CAT)] * 2
    cpu = torch.device("cpu")
    one = list(extract.describe_batches(callers[0], paths, section, True, cpu, 0))
    three = list(extract.describe_batches(callers, paths, section, True, [cpu] * 3, 0))
    assert [r for _, _, r in three] == [r for _, _, r in one]  # batches in order
    assert [bool(r) for _, _, rows in one for r in rows] == [False] * 4 + [True] + [False] * 2
    for (desc, mirror, _), (desc3, mirror3, _) in zip(one, three, strict=True):
        np.testing.assert_array_equal(desc3, desc)  # single-thread sessions: bit for bit
        np.testing.assert_array_equal(mirror3, mirror)
    assert not np.allclose(one[0][0][0], one[0][0][1], atol=1e-3)  # distinct images
    # auto: batches of 8 on CPU (32 on GPUs) describe as batches of 2 do, bit for bit
    auto = {**section, "batch_size": "auto"}
    assert extract.batch_size(auto, cpu) == 8 and extract.batch_size(section, cpu) == 2
    assert extract.batch_size(auto, torch.device("cuda", 0)) == 32
    ((desc8, mirror8, reasons8),) = extract.describe_batches(callers, paths, auto, True,
                                                             [cpu] * 3, 0)
    assert reasons8 == [r for _, _, rows in one for r in rows]
    np.testing.assert_array_equal(desc8, np.concatenate([d for d, _, _ in one]))
    np.testing.assert_array_equal(mirror8, np.concatenate([m for _, m, _ in one]))


def test_runtime_choice_follows_the_setting_the_device_and_what_is_installed(
        monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(runtime, "onnx_available", lambda: True)
    assert runtime.use_onnx({"runtime": "auto"}, cpu)
    assert not runtime.use_onnx({"runtime": "auto"}, gpu)
    assert not runtime.use_onnx({"runtime": "torch"}, cpu)
    with pytest.raises(UserError, match="CPU only"):
        runtime.use_onnx({"runtime": "onnx"}, gpu)
    monkeypatch.setattr(runtime, "onnx_available", lambda: False)
    assert not runtime.use_onnx({"runtime": "auto"}, cpu)  # torch, with a warning
    with pytest.raises(UserError, match="pip install onnxruntime"):
        runtime.use_onnx({"runtime": "onnx"}, cpu)


def test_a_failed_export_runs_torch_under_auto_and_stops_under_onnx(tmp_path: Path,
                                                                    monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    model = GlobalDescriptor(ModelConf(image_size=64)).eval()

    def broken(*_):
        raise runtime.ExportError("torch.onnx.export failed: unsupported operator")

    monkeypatch.setattr(runtime, "export", broken)
    section = {"runtime": "auto"}
    assert runtime.cpu_network(model, section, tmp_path, 1) is model
    with pytest.raises(UserError, match="unsupported operator"):
        runtime.cpu_network(model, {"runtime": "onnx"}, tmp_path, 1)


def test_an_export_is_named_after_its_weights_and_checked_against_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    one, two = (GlobalDescriptor(ModelConf(image_size=64)).eval() for _ in range(2))
    assert runtime.onnx_path(one, tmp_path) == runtime.onnx_path(one, tmp_path)
    assert runtime.onnx_path(one, tmp_path) != runtime.onnx_path(two, tmp_path)
    # an export of other weights under this network's name is caught before any use
    runtime.export(two, runtime.onnx_path(one, tmp_path))
    with pytest.raises(runtime.ExportError, match="describes differently") as caught:
        runtime.OnnxDescriptor(one, tmp_path, 1)
    cosine = float(re.search(r"cosine (-?[\d.]+)", str(caught.value)).group(1))
    assert cosine != 0.0 and cosine < runtime.MIN_COSINE  # the measured cosine, not a floor
    assert runtime.cpu_network(one, {"runtime": "auto"}, tmp_path, 1) is one
    # an export of another shape and a file ONNX Runtime cannot read: refused the same way
    other = GlobalDescriptor(ModelConf(image_size=64, proj_dim=16)).eval()
    runtime.export(other, runtime.onnx_path(one, tmp_path))
    with pytest.raises(runtime.ExportError, match="shape"):
        runtime.OnnxDescriptor(one, tmp_path, 1)
    runtime.onnx_path(one, tmp_path).write_bytes(b"not an onnx model")
    with pytest.raises(runtime.ExportError, match="cannot load"):
        runtime.OnnxDescriptor(one, tmp_path, 1)
    assert runtime.cpu_network(one, {"runtime": "auto"}, tmp_path, 1) is one
