"""cleanvision: its exact and near-duplicate sets (hashes) as groups; it gives no scores, so
every pair within a set scores 1 (ties)."""

import itertools
import json
import os
import sys

from cleanvision import Imagelab


def main(images: str, out: str) -> None:
    lab = Imagelab(data_path=images)
    lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
    sets = [[os.path.relpath(p, images) for p in s]
            for kind in ("exact_duplicates", "near_duplicates") for s in lab.info[kind]["sets"]]
    pairs = {tuple(sorted(p)) for s in sets for p in itertools.combinations(s, 2)}
    with open(out, "w") as f:
        json.dump({"pairs": [[a, b, 1.0] for a, b in sorted(pairs)], "groups": sets}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
