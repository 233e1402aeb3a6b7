"""`ced_lightning.engines.launch`: ranks as the launchers set them, and the multirun guard that lets a cluster
launcher's ranks through. (`test_train.py::test_ddp_two_processes_share_one_run_folder` runs the DDP relaunch
end to end.)"""

from __future__ import annotations

import pytest
import torch

from ced_lightning import compose_config
from ced_lightning.engines.launch import (
    check_multirun_ddp,
    global_rank,
    launched_externally,
    requested_processes,
    set_cpu_threads,
)


def test_multirun_ddp_is_allowed_when_a_cluster_launcher_started_the_ranks() -> None:
    cfg = compose_config(["hydra.mode=MULTIRUN", "trainer=cpu", "trainer.devices=1"])
    check_multirun_ddp(cfg)  # one process per job: nothing to relaunch
    assert requested_processes(compose_config(["trainer.devices='0,1'", "trainer.num_nodes=2"]).trainer) == 4
    assert launched_externally({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert launched_externally({"TORCHELASTIC_RUN_ID": "x"}) and launched_externally({"SLURM_NTASKS": "8"})
    assert not launched_externally({"SLURM_NTASKS": "1"})


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, 3),  # torchrun (or Lightning after setup)
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, 5),  # srun: every task ran as rank 0 before
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "LOCAL_RANK": "2"}, 2),  # one task; Lightning's children
        ({"LOCAL_RANK": "1", "NODE_RANK": "2"}, 3),
    ],
)
def test_global_rank_before_lightning_sets_it(monkeypatch: pytest.MonkeyPatch, env: dict, rank: int) -> None:
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank


def test_set_cpu_threads_pins_the_count_leaves_it_unasked_and_refuses_zero() -> None:
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads(None) == 1  # null: whatever the process has
        assert set_cpu_threads(2) == 2 == torch.get_num_threads()
        with pytest.raises(ValueError, match=r"num_threads=0: give a thread count of at least 1, or null"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
