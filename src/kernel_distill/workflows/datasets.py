"""``kernel-distill datasets``: the datasets and where they are found."""

from __future__ import annotations

import argparse
import dataclasses

from kernel_distill.workflows.common import Log


@dataclasses.dataclass(frozen=True)
class DatasetsRequest:
    data_dir: str | None = None  # None: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("datasets", help="list the datasets and where they are found")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: $KERNEL_DISTILL_DATA, else ~/.cache/kernel_distill)")


def request_from_args(args: argparse.Namespace) -> DatasetsRequest:
    return DatasetsRequest(args.data_dir)


def run(request: DatasetsRequest, log: Log = print) -> None:
    """Print the data directory and one line per dataset: its status and location. Writes nothing."""
    from kernel_distill.data import available_datasets, check_data_dir_exists

    root = check_data_dir_exists(request.data_dir)
    log(f"data directory: {root}{'' if root.is_dir() else ' (not created yet: downloads create it)'}")
    rows = available_datasets(request.data_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        log(f"  {r['name']:<{width}}  {r['status']:<34} {r['location']}")
