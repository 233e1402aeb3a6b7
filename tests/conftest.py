from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a network service: W&B runs offline and hubs are off.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"
CED_REFERENCE = DATA / "ced_reference"


@pytest.fixture(scope="session")
def ced_reference() -> Path:
    return CED_REFERENCE
