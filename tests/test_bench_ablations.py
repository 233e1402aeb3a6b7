"""bench.ablations: every row composes, and rows that change the logit store read a store of their own."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

COMMON = ["experiment=student_demo", "+summary=false", "data.label_only_baseline=false"]


@pytest.fixture(scope="module")
def ablations():
    # `bench` is a top-level package beside `tests`, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        yield importlib.import_module("bench.ablations")
    finally:
        sys.path.pop(0)


def test_every_row_composes_and_store_changes_get_their_own_store(ablations):
    CONDITIONS, LABEL_ONLY, compose_cfg = ablations.CONDITIONS, ablations.LABEL_ONLY, ablations.compose_cfg
    stores: dict[tuple, str] = {}
    for name, overrides in CONDITIONS.items():
        cfg = compose_cfg([*COMMON, *overrides])
        assert cfg.task.name == "distill", name
        extract = cfg.data.extract
        key = (cfg.teacher.name, extract.topk, extract.epochs, extract.quantization)
        # One store per extraction setting: two settings never share a path (a stale store would be reused).
        assert stores.setdefault(key, str(cfg.data.logits)) == str(cfg.data.logits), name
    assert len(set(stores.values())) == len(stores)
    assert LABEL_ONLY in CONDITIONS


def test_paper_and_our_inconsistency_differ_only_in_the_shift(ablations):
    CONDITIONS, compose_cfg = ablations.CONDITIONS, ablations.compose_cfg
    paper = compose_cfg([*COMMON, *CONDITIONS["inconsistent as the paper: no shift, fresh masks"]])
    ours = compose_cfg([*COMMON, *CONDITIONS["inconsistent as ours: fresh shift and masks"]])
    assert not paper.distill.consistent and not ours.distill.consistent
    assert (paper.distill.inconsistent_shift, ours.distill.inconsistent_shift) == ("none", "fresh")


def test_table_gives_mean_and_spread_per_row(ablations):
    summarize, markdown = ablations.summarize, ablations.markdown
    runs = {
        "a": [
            {"val/mAP": 0.5, "test/mAP": 0.4, "minutes": 1.0},
            {"val/mAP": 0.7, "test/mAP": 0.6, "minutes": 1.0},
        ]
    }
    out = {
        "config": {"experiment": "student_demo", "epochs": 6, "seeds": [0, 1], "jobs": 2, "command": "x"},
        "minutes": 2.0,
        "results": summarize(runs),
    }
    text = markdown(out)
    assert "| a | 0.6000 ± 0.1414 | 0.5000 ± 0.1414 |" in text


def test_a_command_started_in_process_composes_inside_and_outside_a_hydra_app(tmp_path):
    # bench.ablations builds missing teachers outside any Hydra app (after `compose_config`): the demo's inner
    # commands must compose there too, and inside an app without replacing its runtime config.
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ced_lightning import compose_config, compose_inner

    outer = compose_config([*COMMON], tmp_path / "outer")
    assert not GlobalHydra.instance().is_initialized()
    teacher = compose_inner("train", ["experiment=teacher_demo_cnn", f"++paths.output_dir={tmp_path}/t"])
    assert teacher.task.name == "supervised"
    assert compose_inner("extract", ["topk=3"]).topk == 3
    assert list(HydraConfig.get().overrides.task) == list(outer.hydra.overrides.task) == COMMON


def test_a_stopped_invocation_keeps_its_finished_runs(ablations, tmp_path):
    # bench.ablations takes hours: what finished is kept and a rerun with the same overrides runs the rest.
    CONDITIONS, previous_runs, markdown = ablations.CONDITIONS, ablations.previous_runs, ablations.markdown
    first, second = list(CONDITIONS)[:2]
    result = {"val/mAP": 0.5, "test/mAP": 0.4, "minutes": 3.0}
    saved = {
        "config": {
            "common_overrides": ["a=1"],
            "seeds": [0, 1, 2],
            "experiment": "x",
            "epochs": 6,
            "jobs": 2,
        },
        "runs": {first: {"0": result, "1": result}, "no longer a row": {"0": result}},
    }
    path = tmp_path / "ablations.json"
    path.write_text(__import__("json").dumps(saved))
    assert previous_runs(path, ["a=1"], [], fresh=False) == {first: {"0": result, "1": result}}
    assert previous_runs(path, ["a=2"], [], fresh=False) == {}  # other overrides: nothing kept
    assert previous_runs(path, ["a=1"], [first], fresh=False) == {}  # only= reruns the row
    assert previous_runs(path, ["a=1"], [], fresh=True) == {}
    # A file written before per-run results: its rows' seeds in order.
    old = {"config": saved["config"], "results": ablations.summarize({second: [result, result]})}
    path.write_text(__import__("json").dumps(old))
    assert previous_runs(path, ["a=1"], [], fresh=False) == {second: {"0": result, "1": result}}
    out = {"config": {**saved["config"], "command": "c"}, "minutes": 1.0}
    out["results"] = ablations.summarize({first: [result, result]})
    assert f"| {first} (2 of 3 seeds) |" in markdown(out)


def test_start_rows_and_a_released_start_not_in_cache_is_listed_not_run(
    ablations, tmp_path, monkeypatch, ced_reference
):
    """Scratch against the released CED-Tiny (issue 16): the released row runs only where its file is cached
    or can be downloaded; offline without it the table says so instead of failing the whole bench."""
    import shutil

    from ced_lightning.models import RELEASED

    CONDITIONS, compose_cfg = ablations.CONDITIONS, ablations.compose_cfg
    scratch, released = (
        [*COMMON, *CONDITIONS[n]]
        for n in (
            "student from scratch (no pretrained start)",
            "student from the released CED-Tiny (its first 4 blocks)",
        )
    )
    assert compose_cfg(scratch).model.init_from is None
    cfg = compose_cfg(released)
    assert (cfg.model.init_from, cfg.model.depth, cfg.model.init_strict) == ("ced_tiny", 4, False)
    assert str(compose_cfg(COMMON).model.init_from).endswith("demo/teachers/ced_tiny.ckpt")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ablations.unavailable_start(scratch) is None
    reason = ablations.unavailable_start(released)
    assert reason and "'ced_tiny'" in reason
    out = {
        "config": {"experiment": "student_demo", "epochs": 6, "seeds": [0], "jobs": 1, "command": "x"},
        "minutes": 0.0,
        "results": {},
        "not_run": {"student from the released CED-Tiny (its first 4 blocks)": reason},
    }
    text = ablations.markdown(out)
    assert f"Not run here:\n- student from the released CED-Tiny (its first 4 blocks): {reason}" in text
    assert "| student from the released" not in text  # every row of the table has its seeds
    cached = RELEASED["ced_tiny"].torch_cache_path
    cached.parent.mkdir(parents=True)
    shutil.copy(ced_reference / "ced_tiny_depth2_random.pt", cached)
    assert ablations.unavailable_start(released) is None


def test_kept_runs_on_other_teachers_are_run_again_and_say_why(ablations, tmp_path, capsys):
    """Resume compares the teachers' weights, not only the overrides: a rebuilt teacher (other weights at the
    same path) makes the runs recorded on the old one run again, with a line naming the row, the seeds and
    the teacher; the same weights saved again keep them."""
    from conftest import save_tiny_teacher

    CONDITIONS, row_fingerprint, same_teachers = (
        ablations.CONDITIONS,
        ablations.row_fingerprint,
        ablations.same_teachers,
    )
    ensemble, single = next(iter(CONDITIONS)), "single teacher (MobileNet, the best one)"
    teachers = tmp_path / "demo" / "teachers"
    teachers.mkdir(parents=True)
    for name in ("ced_tiny", "mobilenet"):
        save_tiny_teacher(teachers / f"{name}.ckpt", num_classes=16)
    common = [*COMMON, f"paths.data_dir={tmp_path}"]
    before = {n: row_fingerprint([*common, *CONDITIONS[n]]) for n in (ensemble, single)}
    assert set(before[ensemble]) == {"teacher ced_tiny", "teacher mobilenet", "start"}
    assert before[single].keys() == {"teacher mobilenet", "start"}
    # The student starts from the CED teacher's weights: the same file, the same digest.
    assert before[ensemble]["start"] == before[ensemble]["teacher ced_tiny"] == before[single]["start"]

    result = {"val/mAP": 0.5, "test/mAP": 0.4, "minutes": 3.0}
    kept = {
        ensemble: {"0": {**result, "fingerprint": before[ensemble]}, "1": dict(result)},  # "1": no record
        single: {"0": {**result, "fingerprint": before[single]}},
    }
    # The same weights saved again (a new file, the same tensors): the runs stay.
    save_tiny_teacher(teachers / "mobilenet.ckpt", num_classes=16)
    again = {n: row_fingerprint([*common, *CONDITIONS[n]]) for n in (ensemble, single)}
    assert again == before
    same, dropped = same_teachers(kept, again)
    assert same == {ensemble: {"0": kept[ensemble]["0"]}, single: kept[single]}
    assert dropped == [
        f"{ensemble}: seeds 1 ran on other weights (no fingerprint of their teachers was "
        "recorded); running them again"
    ]

    # The MobileNet teacher rebuilt with other weights: both rows that learn from it start over.
    torch = pytest.importorskip("torch")
    from ced_lightning.models import create_ced, save_ced

    torch.manual_seed(1)
    save_ced(create_ced("ced_tiny", depth=1, num_classes=16), teachers / "mobilenet.ckpt")
    after = {n: row_fingerprint([*common, *CONDITIONS[n]]) for n in (ensemble, single)}
    assert after[ensemble]["teacher mobilenet"] != before[ensemble]["teacher mobilenet"]
    assert after[ensemble]["teacher ced_tiny"] == before[ensemble]["teacher ced_tiny"]
    same, dropped = same_teachers(kept, after)
    assert same == {}
    old, new = before[single]["teacher mobilenet"][:12], after[single]["teacher mobilenet"][:12]
    assert f"{single}: seeds 0 ran on other weights (teacher mobilenet: {old} then, {new} now)" in dropped[1]
    assert dropped[0].startswith(f"{ensemble}: seeds 0, 1 ran on other weights (")

    # The table names the teachers its rows ran on.
    out = {
        "config": {"experiment": "x", "epochs": 6, "seeds": [0], "jobs": 1, "command": "c"},
        "minutes": 1.0,
        "runs": {single: {"0": {**result, "fingerprint": after[single]}}},
        "results": ablations.summarize({single: [result]}),
    }
    assert f"Teachers of every row (sha256 of their weights): mobilenet {new}." in ablations.markdown(out)
