"""Check a store whole: `python -m ced_lightning.check store=PATH_OR_URL` (or `ced-check store=...`).

Detects the kind (audio store or logit store), then checks that every chunk object the store records as
written is there and decodes, and that the commit records agree with the arrays (`store.scan`). Prints one
line per problem and exits 1, or a short report (kind, clips, epochs, arrays, bytes) and exits 0. It reads
the whole store: on an object store, one listing per array plus a read of every object.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import ced_lightning
from ced_lightning.store.remote import redact_url
from ced_lightning.store.scan import ScanResult, scan_store


def report_lines(result: ScanResult) -> list[str]:
    """The lines `check` prints: each problem, or the report; notes after either."""
    if result.problems:
        lines = list(result.problems)
    else:
        figures = ", ".join(f"{key} {value}" for key, value in result.figures.items())
        lines = [f"{result.kind} {redact_url(result.url)}: OK ({figures})"]
    return lines + [f"note: {note}" for note in result.notes]


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="check", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "store") or not cfg.get("store"):
        print("store= is required: python -m ced_lightning.check store=PATH_OR_URL", file=sys.stderr)
        sys.exit(2)
    result = scan_store(str(cfg.store))
    for line in report_lines(result):
        print(line, file=sys.stdout if result.ok else sys.stderr)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
