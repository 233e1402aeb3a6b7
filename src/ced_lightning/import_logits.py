"""`python -m ced_lightning.import_logits`: the paper's released teacher logits into a logit store.

    python -m ced_lightning.import_logits source=DIR audio_store=STORE output=LOGIT_STORE \
        [quantization=float16|int8] [allow_unmatched_rows=false] [allow_clips_without_rows=false] \
        [allow_long_rows=false] [allow_repeated_rows=false]

`source` is a released `chunk_10` folder; the import itself (matching, replay, resuming, the figures it
reports) is `ced_lightning.release.importer.run_import`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ced_lightning import conf_dir
from ced_lightning.engines.launch import command_errors
from ced_lightning.release.importer import run_import


@hydra.main(config_path=str(conf_dir()), config_name="import_logits", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    run_import(cfg)


if __name__ == "__main__":
    main()
