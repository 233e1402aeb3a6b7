"""HEAR module for CED-Small: `hear-validator ced_lightning.hear.ced_small` loads the released `ced_small`
when no weights file is given (`-m PATH` loads another checkpoint of any size)."""

from ced_lightning.hear import get_scene_embeddings, get_timestamp_embeddings, load_model_of

__all__ = ["get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

load_model = load_model_of("ced_small")
