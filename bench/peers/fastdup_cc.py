"""fastdup: embedding neighbours (its bundled model) scored by their similarity, groups =
its connected components (``ccthreshold``, default 0.96)."""

import json
import os
import sys
import tempfile

import fastdup


def main(images: str, out: str) -> None:
    work = tempfile.mkdtemp(prefix="fastdup-")
    fd = fastdup.create(work_dir=work, input_dir=images)
    fd.run(overwrite=True, verbose=False)
    sim = fd.similarity()
    name = lambda p: os.path.relpath(p, images)  # noqa: E731
    pairs = {}
    for a, b, d in zip(sim["filename_from"], sim["filename_to"], sim["distance"], strict=True):
        key = tuple(sorted((name(a), name(b))))
        pairs[key] = max(float(d), pairs.get(key, -1.0))
    cc, _ = fd.connected_components()
    cc = cc[cc["count"] > 1] if "count" in cc else cc
    groups = [[name(p) for p in g["filename"]] for _, g in cc.groupby("component_id")]
    with open(out, "w") as f:
        json.dump({"pairs": [[a, b, s] for (a, b), s in pairs.items()],
                   "groups": [g for g in groups if len(g) > 1]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
