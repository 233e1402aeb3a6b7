"""`model.init_from=teacher`: a student starts as the strongest teacher of its own architecture among those
that made its logit store (`engines.student_start`), the demo's start for any data, in one override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ced_lightning import compose_config
from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.scoring import evaluate_teachers
from ced_lightning.engines.student_start import misfit, recorded_maps
from ced_lightning.engines.training import build_network
from ced_lightning.extract import run_extract
from ced_lightning.models import create_ced, load_checkpoint, save_ced
from ced_lightning.store import AudioStore
from conftest import save_tiny_teacher, tiny_student_overrides


def student_cfg(demo: dict[str, str], logits: str, *extra: str):
    overrides = [o for o in tiny_student_overrides(demo, logits) if not o.startswith("model.init_from")]
    return compose_config([*overrides, "model.init_from=teacher", *extra])


def test_misfit_names_what_keeps_a_teacher_from_starting_the_student() -> None:
    student = create_ced("ced_mini", num_classes=16)
    assert misfit(student, create_ced("ced_mini", depth=4, num_classes=16).state_dict()) is None
    assert misfit(student, create_ced("ced_mini", depth=14, num_classes=16).state_dict()) is None  # cut
    assert (
        misfit(student, create_ced("ced_tiny", num_classes=16).state_dict())
        == "width 192, the student's is 256"
    )
    other_classes = misfit(student, create_ced("ced_mini", depth=4, num_classes=10).state_dict())
    assert other_classes == "outputlayer.1.weight [10, 256], the student's [16, 256]"
    assert misfit(student, {"features.0.weight": torch.zeros(3)}) == "not a CED"


def test_the_student_starts_as_its_single_fitting_teacher(tiny_demo) -> None:
    """The tiny demo's store has one 1-block CED-Tiny teacher: a 2-block student starts as it (the second
    block an identity, so both give the same outputs), and the run's config records the file."""
    cfg = student_cfg(tiny_demo, tiny_demo["logits"], "model.depth=2")
    classes = AudioStore.open(tiny_demo["train"]).num_classes
    student = build_network(cfg, classes).eval()
    teacher_file = str(Path(tiny_demo["root"]) / "teacher.pt")
    assert cfg.model.init_from == teacher_file
    teacher = load_checkpoint(teacher_file).model.eval()
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(wave), teacher(wave), rtol=0, atol=1e-6)


def test_a_teacher_of_another_width_is_refused_with_the_reason(tiny_demo) -> None:
    cfg = student_cfg(tiny_demo, tiny_demo["logits"], "model=ced_mini", "~model.depth")
    with pytest.raises(
        ConfigError, match=r"no teacher of the logit store .* \(width 192, the student's is 256\)"
    ):
        build_network(cfg, AudioStore.open(tiny_demo["train"]).num_classes)


@pytest.mark.parametrize("checked", [True, False])
def test_of_two_fitting_teachers_the_stronger_on_validation_is_chosen(tiny_demo, tmp_path, checked) -> None:
    """Two CED-Tiny teachers of different weights and depths: the student starts as the one with the higher
    validation mAP, read from the teacher check `extract` kept in the store (`checked`) or
    measured on data.val where it kept none."""
    classes = AudioStore.open(tiny_demo["train"]).num_classes
    first = save_tiny_teacher(tmp_path / "first.pt", classes)
    torch.manual_seed(1)
    second = tmp_path / "second.pt"
    save_ced(create_ced("ced_tiny", depth=2, num_classes=classes), second)
    logits = str(tmp_path / "logits.zarr")
    overrides = [
        f"audio_store={tiny_demo['train']}",
        f"output={logits}",
        "teacher=ced",
        f"teacher.checkpoints=[{first},{second}]",
        "epochs=1",
        "topk=4",
        "clip_seconds=1.0",
        "allow_weak_teachers=true",
        "trainer.enable_progress_bar=false",
    ]
    if checked:
        overrides.append(f"teacher_check.store={tiny_demo['val']}")
    run_extract(compose_config(overrides, output_dir=tmp_path / "extract_run", config="extract"))
    assert (recorded_maps(logits) is not None) == checked

    maps = evaluate_teachers(
        {p.stem: load_checkpoint(p).model for p in (first, second)}, tiny_demo["val"], batch_size=16
    )["teachers"]
    stronger = max(maps, key=lambda name: maps[name]["mAP"])
    assert maps["first"]["mAP"] != maps["second"]["mAP"]
    cfg = student_cfg(tiny_demo, logits, "model.depth=2", "data.eval_batch_size=16")
    build_network(cfg, classes)
    assert Path(cfg.model.init_from).stem == stronger


def test_a_teacher_on_own_data_fine_tunes_from_the_checkpoint_given(tiny_demo, tmp_path) -> None:
    """The other half of a strong start: `data.init_from=PATH` starts every CED network of `data=custom`, a
    teacher too, from the user's best file (here a `save_ced` .pt; Lightning .ckpt files are read the same
    way, `test_models`), its first blocks for the 4-block teacher, the head fresh for other classes."""
    classes = AudioStore.open(tiny_demo["train"]).num_classes
    torch.manual_seed(3)
    best = tmp_path / "best.pt"
    save_ced(create_ced("ced_tiny", depth=6, num_classes=classes + 1), best)
    root = Path(tiny_demo["train"]).parent
    cfg = compose_config(
        ["experiment=teacher_demo_ced", "data=custom", f"data.root={root}", f"data.init_from={best}"]
    )
    assert cfg.task.name == "supervised" and cfg.model.init_from == str(best)
    teacher = build_network(cfg, classes)
    start = create_ced("ced_tiny", depth=6, num_classes=classes + 1)
    start.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["model"])
    loaded = start.state_dict()
    for key, tensor in teacher.state_dict().items():
        if key.startswith("blocks.") or key.startswith("patch_embed."):
            torch.testing.assert_close(tensor, loaded[key], rtol=0, atol=0)
    assert teacher.outputlayer[1].weight.shape[0] == classes  # a new head for this data's classes
