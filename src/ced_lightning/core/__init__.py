"""Pure building blocks (no Lightning, no Hydra, no I/O): the maths every layer above uses."""
