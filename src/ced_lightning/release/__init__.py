"""The paper's released teacher logits: reading the release (`reader`), replaying its per-clip seeds into
augmentation parameters (`replay`) and importing it into a logit store (`importer`, the engine of the
`import_logits` command). A wing beside `engines`: it reads `store`, `core` and `data`; nothing below imports
it."""
