"""Write each zoo set's storage and, where measured, its DD-Ranking scores into the zoo index; regenerate the
README's zoo table. Nothing is measured here: the scores come from ``benchmarks/results/ranking.jsonl``
(``benchmarks/ranking.py``), the storage from the shipped files' array shapes.

    .venv/bin/python tools/zoo_rank.py [--results benchmarks/results/ranking.jsonl]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tools")]
RESULTS = ROOT / "benchmarks" / "results" / "ranking.jsonl"


def ranking_field(record: dict) -> dict:
    """The index's ``ranking`` field of one benchmark/ranking record (fractions, as in records)."""
    m = record["metrics"]
    scores = {k[len("ranking_"):]: v for k, v in m.items() if k.startswith("ranking_") and "accuracy" not in k}
    accuracies = {k[len("ranking_accuracy_"):]: v for k, v in m.items() if k.startswith("ranking_accuracy_")}
    config = record["config"]
    return dict(scores, accuracies=accuracies, seeds=config["seeds"], recipe=config["recipe"],
                toggled_augment=config["ranking"]["toggled_augment"], full_set=config["full_set"],
                date=record["provenance"]["date"], record="benchmarks/results/ranking.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args()
    import zoo_add

    from kernel_distill import zoo
    from kernel_distill.results import read_records

    records = {r["config"]["set"]: r for r in (read_records(args.results) if args.results.is_file() else [])}
    entries = zoo.read_index()
    for e in entries:
        distilled = zoo.load(e["name"])
        e["storage"] = dict(image_bytes=int(distilled.images.size * 4), label_bytes=int(distilled.labels.size * 4),
                            what="float32 images and labels as a user holds them; the file adds its preprocessing")
        for name in (e["name"], *e.get("aliases", [])):  # a record made under a set's former name counts
            if name in records:
                e["ranking"] = ranking_field(records[name])
    zoo_add._write_index(zoo.INDEX_FILE, entries, regenerate_readme=True)
    print(f"{len(entries)} sets: storage written; DD-Ranking scores for {sum('ranking' in e for e in entries)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
