"""Train the pair verifier (``match_score.pair_net``) on pairs from training photos.

    copydet train-verifier --photos ../shared/trainset/photos \\
        --more-photos work/moresplit/fit --measure work/samesetting work/frames --work work

The net must never see the photos the fusion is calibrated on (``calib`` part of
``--photos``) nor the photos the look-alike and frame benchmarks measure with (``make
more-split`` keeps them out of ``moresplit/fit``). Its pairs are the local branch's verified
candidates (``pipeline.run_candidates``, then every candidate view verified and aligned) on:

- ``copies``: a DISC21-style benchmark of the ``fit`` photos (edited copies of every kind,
  edited distractors);
- ``lookalikes``: the look-alike benchmark of the ``fit`` photos (real groups of
  ``data/lookalike_groups.csv`` and made look-alikes, as distractors);
- ``backdrop_copies``: edited copies of ``--more-photos`` (garments on floors and beds, pets:
  a copy of such a photo must stay a copy);
- ``real_pairs`` and ``real_fit_pairs``: ``--more-photos``, and the ``fit`` photos, each
  against itself with ``REAL_CANDIDATES`` candidates per query view: every verified pair of
  two different photos is a non-copy, the pipeline's own hard negatives (garments on one
  backdrop, burst shots).

A pair is a copy when the ground truth says the query was made from the reference (its best
verified view only). Pairs are split by reference photo into a part to train on and a part
that only measures. The learning curve (nets trained on growing shares of the training part,
measured on the held-out part and on the ``--measure`` benchmarks: real look-alike groups and
frames it never saw) goes to ``docs/pair_net_curve.png``, the figures to the JSON beside the
weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import pipeline
from common import UserError, cli
from common.config import REPO_ROOT, digest, file_digest
from common.images import list_images
from common.io import atomic_path, read_csv, write_json
from common.logs import start_run
from common.parallel import limit_threads, parallel_map, spread, workers
from data.make_benchmark import QUERY_DIR, REF_DIR, built_once, make_benchmark
from data.make_lookalike import GROUPS, make_lookalike
from data.split import split_photos
from local_fea.features import LocalFeatures
from match_score import pair_net
from match_score.verify import NOT_IN_NAME, candidate_pairs, verify_view

MODEL_KEY = "match_score.pair_model"
COPIES = {"n_refs": 500, "n_positives": 600, "n_distractors": 250, "seed": 27}
LOOKALIKES = {"n_made": 150, "n_refs": 200, "n_positives": 150, "n_distractors": 100,
              "seed": 28}
BACKDROP_COPIES = {"n_refs": 300, "n_positives": 300, "n_distractors": 0, "seed": 29}
REAL_CANDIDATES = 20  # candidates per query view when a photo folder meets itself
HELD_OUT = 0.2  # share of reference photos whose pairs only measure
SHARES = (0.125, 0.25, 0.5, 1.0)  # of the training part, for the learning curve
TRAIN = {"epochs": 12, "batch": 128, "lr": 3e-3, "weight_decay": 1e-4, "seed": 0}


@dataclass
class PairSet:
    """Aligned pairs, their labels and the photo that decides their part (train / measure)."""

    x: np.ndarray  # float16 (n, channels, side, side)
    y: np.ndarray  # 1 copy, 0 not
    key: np.ndarray  # the reference photo (or the pair's first photo for real pairs)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> PairSet:
        return PairSet(self.x[index], self.y[index], self.key[index])

    @staticmethod
    def concat(sets: list[PairSet]) -> PairSet:
        return PairSet(*(np.concatenate([getattr(s, f) for s in sets])
                         for f in ("x", "y", "key")))


@dataclass(frozen=True, eq=False)
class AlignTask:
    """Verify and align a list of (query, reference, view) pairs (a worker's task)."""

    queries: str
    references: str
    conf: dict[str, Any]  # the match_score section
    feature_short_side: int

    def __call__(self, pairs: list[tuple[str, str, str]]) -> tuple[int, list[tuple]]:
        """(pairs verified, the aligned ones as (query, reference, view, inliers, pair))."""
        limit_threads()
        qf, rf = LocalFeatures(self.queries), LocalFeatures(self.references)
        out = []
        for q, r, view in pairs:
            v = verify_view(qf, rf, q, r, view, self.conf, self.feature_short_side)
            if v.aligned is not None:
                out.append((q, r, view, v.inliers_h1, v.aligned))
        return len(pairs), out


def aligned_candidates(conf: dict[str, Any], queries: Path, references: Path,
                       work_dir: Path) -> list[tuple]:
    """(query, reference, view, inliers, aligned pair) of every local candidate with a
    homography, sorted (the workers finish in any order; the training order must not)."""
    out = pipeline.run_candidates(conf, list_images(queries), list_images(references),
                                  work_dir, pipeline.Record())
    pairs = [(q, r, v) for q, r, v, _ in candidate_pairs(out["candidates"]) if q != r]
    task = AlignTask(str(out["query_store"]), str(out["reference_store"]), conf["match_score"],
                     conf["local_fea"]["short_side"])
    tasks = spread(pairs, 4 * workers(conf["run"]["n_jobs"]))
    rows = []
    for _, done in parallel_map(task, tasks, n_jobs=conf["run"]["n_jobs"], desc="align pairs",
                                unit="pair", total=len(pairs), weight=lambda result: result[0]):
        rows += done
    return sorted(rows, key=lambda row: row[:3])


def labelled(rows: list[tuple], positives: set[tuple[str, str]],
             key: Callable[[str, str], str]) -> PairSet:
    """Copies (their best view) and non-copies of ``rows`` (``aligned_candidates``)."""
    best: dict[tuple[str, str], int] = {}
    for i, (q, r, _, inliers, _) in enumerate(rows):
        if (q, r) not in best or inliers > rows[best[(q, r)]][3]:
            best[(q, r)] = i
    keep = [i for i, (q, r, *_) in enumerate(rows)
            if (q, r) not in positives or best[(q, r)] == i]
    return PairSet(np.stack([rows[i][4] for i in keep]) if keep else np.zeros((0,)),
                   np.array([(rows[i][0], rows[i][1]) in positives for i in keep], np.int64),
                   np.array([key(rows[i][0], rows[i][1]) for i in keep]))


def benchmark_pairs(conf: dict[str, Any], bench: Path, work_dir: Path, name: str) -> PairSet:
    gt = read_csv(bench / "gt.csv")
    positives = {(r["query_id"], r["reference_id"]) for r in gt if r["reference_id"]}
    rows = aligned_candidates(conf, bench / QUERY_DIR, bench / REF_DIR, work_dir)
    return labelled(rows, positives, lambda q, r: f"{name}/{r}")


def real_pairs(conf: dict[str, Any], photos: Path, work_dir: Path, name: str) -> PairSet:
    """Every aligned candidate pair of two different photos of ``photos``: non-copies."""
    conf = {**conf, "local_search": {**conf["local_search"], "candidates": REAL_CANDIDATES}}
    return labelled(aligned_candidates(conf, photos, photos, work_dir), set(),
                    lambda q, r: f"{name}/{min(q, r)}")


def cached(path: Path, make: Callable[[], PairSet]) -> PairSet:
    """``make()``, saved to ``path`` (npz) the first time, read back after."""
    if not path.exists():
        pairs = make()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=pairs.x, y=pairs.y, key=pairs.key)
    with np.load(path) as f:
        return PairSet(f["x"], f["y"], f["key"])


def pairs_version(conf: dict[str, Any]) -> str:
    """What aligned pairs depend on: the settings of extraction, search and verification."""
    matching = {k: v for k, v in conf["match_score"].items() if k not in NOT_IN_NAME}
    return digest(matching, conf["local_fea"], conf["local_search"])


def training_pairs(conf: dict[str, Any], photos: Path, more_photos: Path,
                   work_dir: Path) -> dict[str, PairSet]:
    """Every source of the module docstring, built and aligned once (cached by content)."""
    root = work_dir / "calibration"
    fit = split_photos(photos, root / "trainsplit")["fit"]
    benches = {
        "copies": (COPIES, lambda out: make_benchmark(fit, out, force=True, **COPIES)),
        "lookalikes": (LOOKALIKES, lambda out: make_lookalike(fit, out, GROUPS, force=True,
                                                              **LOOKALIKES)),
        "backdrop_copies": (BACKDROP_COPIES, lambda out: make_benchmark(
            more_photos, out, force=True, **BACKDROP_COPIES)),
    }
    version = pairs_version(conf)
    made_of = digest(sorted(list_images(fit).ids), sorted(list_images(more_photos).ids),
                     file_digest(GROUPS))  # what the benchmarks are drawn from
    sets = {}
    for name, (params, build) in benches.items():
        bench = built_once(root / f"verifier-{name}-{digest(params, made_of)}", build)
        sets[name] = cached(root / "pair_net" / f"{name}-{digest(bench.name, version)}.npz",
                            lambda b=bench, n=name: benchmark_pairs(conf, b, work_dir, n))
    for name, folder in (("real_pairs", more_photos), ("real_fit_pairs", fit)):
        ids = sorted(list_images(folder).ids)
        cache = root / "pair_net" / f"{name}-{digest(ids, REAL_CANDIDATES, version)}.npz"
        sets[name] = cached(cache, lambda f=folder, n=name: real_pairs(conf, f, work_dir, n))
    return sets


def key_hash(keys: np.ndarray, salt: str) -> np.ndarray:
    """A number in [0, 1) per key, fixed by the key (and ``salt``: ``data.split`` hashes the
    same ids, so unsalted the training photos would all fall on one side)."""
    return np.array([int(hashlib.sha1(f"{salt}:{k}".encode()).hexdigest()[:8], 16) / 2**32
                     for k in keys])


def held_out(keys: np.ndarray) -> np.ndarray:
    """True for the pairs of about ``HELD_OUT`` of the photos."""
    return key_hash(keys, "pair_net held out") < HELD_OUT


def dihedral(x: Any, k: int) -> Any:
    """One of the 8 flips and transposes of a batch (an aligned pair stays aligned)."""
    if k & 1:
        x = x.flip(3)
    if k & 2:
        x = x.flip(2)
    return x.transpose(2, 3) if k & 4 else x


def train(pairs: PairSet, settings: dict[str, Any] = TRAIN,
          heldout: PairSet | None = None) -> tuple[Any, list[dict[str, float]]]:
    """Fit a fresh net on ``pairs`` (classes weighted equally); return it and, per epoch, the
    mean training loss (and the held-out figures when ``heldout`` is given)."""
    import torch

    torch.manual_seed(settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    net = pair_net.build()
    x, y = torch.from_numpy(pairs.x), torch.from_numpy(pairs.y.astype(np.float32))
    positives = max(float(y.sum()), 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - positives)
                                                                 / positives))
    opt = torch.optim.AdamW(net.parameters(), lr=settings["lr"],
                            weight_decay=settings["weight_decay"])
    steps = settings["epochs"] * -(-len(y) // settings["batch"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=steps)
    history = []
    for epoch in tqdm(range(settings["epochs"]), desc=f"train pair verifier ({len(y)} pairs)",
                      unit="epoch", dynamic_ncols=True):
        net.train()
        losses = []
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), settings["batch"]):
            batch = order[start:start + settings["batch"]]
            xb = dihedral(x[batch].float(), int(rng.integers(8)))
            loss = loss_fn(net(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                        **(figures(net, heldout) if heldout is not None else {})})
    return net.eval(), history


def logits_of(net: Any, pairs: PairSet) -> np.ndarray:
    import torch

    net.eval()
    with torch.inference_mode():
        return np.concatenate([net(torch.from_numpy(pairs.x[s:s + 512]).float()).numpy()
                               for s in range(0, len(pairs), 512)] or [np.zeros(0)])


def figures(net: Any, pairs: PairSet) -> dict[str, float]:
    """ROC AUC (with both classes) and the shares of copies called copies (logit > 0) and of
    non-copies called non-copies (each where there are some)."""
    from sklearn.metrics import roc_auc_score

    z = logits_of(net, pairs)
    copies, others = z[pairs.y == 1], z[pairs.y == 0]
    out = {}
    if len(copies) and len(others):
        out["auc"] = float(roc_auc_score(pairs.y, z))
    if len(copies):
        out["copies_right"] = float((copies > 0).mean())
    if len(others):
        out["non_copies_right"] = float((others <= 0).mean())
    return out


def learning_curve(train_part: PairSet, measures: dict[str, PairSet]) -> list[dict[str, Any]]:
    """The figures on each of ``measures`` of nets trained on growing shares of the training
    photos."""
    share = key_hash(train_part.key, "pair_net share")
    points = []
    for fraction in SHARES:
        part = train_part.take(np.flatnonzero(share < fraction))
        net, _ = train(part)
        points.append({"share": fraction, "pairs": len(part),
                       **{name: figures(net, m) for name, m in measures.items()}})
    return points


def plot(curve: list[dict[str, Any]], history: list[dict[str, Any]], out: Path) -> Path:
    """The learning curve (every measured set and figure) and the final training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = [p["pairs"] for p in curve]
    labels = {"auc": "ROC AUC", "copies_right": "copies called copies",
              "non_copies_right": "non-copies called non-copies"}
    for name in (k for k in curve[0] if isinstance(curve[0][k], dict)):
        for key, label in labels.items():
            if key in curve[0][name]:
                left.plot(n, [p[name][key] for p in curve], "o-", label=f"{name}: {label}")
    left.set(xscale="log", xlabel="training pairs", ylabel="share",
             title="Pair verifier: learning curve")
    left.legend(loc="lower right", fontsize=7)
    epochs = [h["epoch"] for h in history]
    right.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    right.plot(epochs, [1 - h["auc"] for h in history], "o-", label="held-out photos: 1 - AUC")
    right.set(xlabel="epoch", yscale="log", title="Final run")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(conf: dict[str, Any], photos: str | Path, more_photos: str | Path,
         work_dir: str | Path, out: str | Path | None = None,
         curve: str | Path | None = None, measure: Sequence[str | Path] = ()) -> Path:
    """Build and align the training pairs, draw the learning curve, train and save the net.
    ``measure``: benchmark folders of photos it never trains on (``make same-setting``,
    ``make frame-set``), whose aligned candidates it is also measured on."""
    import torch

    work_dir = Path(work_dir)
    if out is None and not conf["match_score"]["pair_model"]:
        raise UserError("match_score.pair_model is null: give --out, the weights file to write")
    out = Path(out) if out else REPO_ROOT / conf["match_score"]["pair_model"]
    sets = training_pairs(conf, Path(photos), Path(more_photos), work_dir)
    version = pairs_version(conf)
    benches = {Path(b).name: Path(b) for b in measure}
    measured = {name: cached(work_dir / "calibration" / "pair_net" /
                             f"measure-{name}-{digest(file_digest(b / 'gt.csv'), version)}.npz",
                             lambda b=b, n=name: benchmark_pairs(conf, b, work_dir, n))
                for name, b in benches.items()}
    run = start_run(work_dir, "calibration.pair_net")
    with run:
        torch.set_num_threads(max(1, workers(conf["run"]["n_jobs"])))
        everything = PairSet.concat(list(sets.values()))
        measure = held_out(everything.key)
        train_part, measure_part = (everything.take(np.flatnonzero(~measure)),
                                    everything.take(np.flatnonzero(measure)))
        for name, s in sets.items():
            run.logger.info("%s: %d pairs, %d copies", name, len(s), int(s.y.sum()))
        points = learning_curve(train_part, {"held-out photos": measure_part, **measured})
        run.logger.info("learning curve: %s", points)
        net, history = train(train_part, heldout=measure_part)
        by_source = {name: figures(net, s.take(np.flatnonzero(held_out(s.key))))
                     for name, s in sets.items()}
        by_source.update({name: figures(net, m) for name, m in measured.items()})
        run.logger.info("held out, by source and benchmark: %s", by_source)
        picture = plot(points, history, Path(curve) if curve else
                       REPO_ROOT / "docs" / "pair_net_curve.png")
        write_json(out.with_suffix(".json"), {
            "trained_on": {"photos": str(photos), "more_photos": str(more_photos),
                           "copies": COPIES, "lookalikes": LOOKALIKES,
                           "backdrop_copies": BACKDROP_COPIES, "held_out": HELD_OUT},
            "train": TRAIN, "pairs": {n: [len(s), int(s.y.sum())] for n, s in sets.items()},
            "learning_curve": points, "history": history, "held_out_by_source": by_source})
        pair_net.save(net, out)  # last: weights never sit beside another net's record
        run.logger.info("pair verifier -> %s (curve: %s)", out, picture)
    return out


def add_arguments(parser: Any) -> None:
    cli.add_fit_args(parser, MODEL_KEY)
    parser.add_argument("--more-photos", required=True, type=Path,
                        help="photos of real settings to train on (`make more-split`'s fit/)")
    parser.add_argument("--curve", type=Path, help="learning-curve picture (default: "
                        "docs/pair_net_curve.png)")
    parser.add_argument("--measure", type=Path, nargs="*", default=[],
                        help="benchmark folders it never trains on, to measure it on too "
                        "(`make same-setting`, `make frame-set`)")


COMMAND = cli.Command("train-verifier", __doc__, add_arguments,
                      lambda conf, a: main(conf, a.photos, a.more_photos, a.work, a.out,
                                           a.curve, a.measure))

if __name__ == "__main__":
    cli.run_module("calibration.pair_net")
