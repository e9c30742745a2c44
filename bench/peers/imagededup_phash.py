"""imagededup PHash: pairs by Hamming distance (score 1 - d/64, every pair within 32 bits
ranked), groups = connected components of ``find_duplicates`` at its default threshold (10)."""

import json
import sys

from imagededup.methods import PHash


def components(links: dict) -> list:
    seen, groups = set(), []
    for start in sorted(links):
        if start in seen or not links[start]:
            continue
        stack, members = [start], []
        seen.add(start)
        while stack:
            node = stack.pop()
            members.append(node)
            for n in links.get(node, []):
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        groups.append(members)
    return groups


def main(images: str, out: str) -> None:
    hasher = PHash(verbose=False)
    encodings = hasher.encode_images(image_dir=images)
    scored = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=32,
                                    scores=True)
    pairs = {tuple(sorted((a, b))): 1 - d / 64 for a, dups in scored.items() for b, d in dups}
    default = {a: [b for b, d in dups if d <= 10] for a, dups in scored.items()}
    with open(out, "w") as f:
        json.dump({"pairs": [[a, b, s] for (a, b), s in pairs.items()],
                   "groups": components(default)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
