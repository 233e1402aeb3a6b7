"""Your own data, first class (issue 16): `data=custom` with train, extract, evaluate and multirun; masks
scaled to the clip length; saved configs that say what the run used; labeled and unlabeled stores read as
one without copying. Stores of 4 s clips from the project's generator; tiny untrained models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, read_write

from ced_lightning import compose_config
from ced_lightning.core.augment import AugmentRecipe, scale_to_clip
from ced_lightning.data.demo import DEMO_CLASSES, build_demo_stores, generate_demo_clip
from ced_lightning.store import AudioStore, LogitStore
from ced_lightning.store.audio_writer import write_audio_store
from ced_lightning.store.concat import ConcatAudioStore, open_audio
from conftest import run_command, save_tiny_teacher

CLIP_SECONDS = 4.0


def _write_unlabeled(url: str, count: int, seed: int = 7) -> AudioStore:
    """A pool of unlabeled 4 s clips (as `prepare` writes a folder without labels: no class list)."""
    clips = (
        (f"pool_{i:04d}", generate_demo_clip(seed, 10_000 + i, CLIP_SECONDS)[0], None) for i in range(count)
    )
    return write_audio_store(url, clips, source="test-pool")


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, str]:
    """A folder of one's own stores: labeled train/val/test and an unlabeled pool (4 s clips), one teacher."""
    root = tmp_path_factory.mktemp("own")
    stores = build_demo_stores(str(root), seed=3, train=12, val=8, test=8, clip_seconds=CLIP_SECONDS)
    unlabeled = str(root / "unlabeled.zarr")
    _write_unlabeled(unlabeled, 6)
    teacher = save_tiny_teacher(root / "teacher.pt", len(DEMO_CLASSES))
    return {**stores, "unlabeled": unlabeled, "root": str(root), "teacher": str(teacher)}


def _pool(own: dict[str, str]) -> str:
    return f"data.stores.distill=[{own['train']},{own['unlabeled']}]"


def _extract_overrides(own: dict[str, str], *extra: str, pool: str | None = None) -> list[str]:
    return [
        "data=custom",
        f"data.root={own['root']}",
        f"data.clip_seconds={CLIP_SECONDS}",
        pool or _pool(own),
        "teacher=ced",
        f"teacher.checkpoints=[{own['teacher']}]",
        "epochs=1",
        "topk=4",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "num_workers=0",
        "allow_weak_teachers=true",  # an untrained teacher: the check runs, the store is made anyway
        *extra,
    ]


@pytest.fixture(scope="module")
def logits(own: dict[str, str], tmp_path_factory) -> str:
    """The teacher's logit store over [train, unlabeled], made by `extract` from `data=custom` alone."""
    from ced_lightning.extract import run_extract

    cfg = compose_config(_extract_overrides(own), tmp_path_factory.mktemp("extract_run"), config="extract")
    assert cfg.output == f"{own['root']}/logits.zarr" and cfg.teacher_check.store == own["val"]
    return str(run_extract(cfg).url)


def _train_overrides(own: dict[str, str], *extra: str) -> list[str]:
    return [
        "experiment=ced_tiny",
        "+model.depth=1",
        "data=custom",
        f"data.root={own['root']}",
        _pool(own),
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
        "data.init_from=null",  # from scratch: no released file here (the default start has tests of its own)
        *extra,
    ]


# -- data=custom ---------------------------------------------------------------------------------------


def test_custom_data_builds_nothing_and_names_the_missing_store(tmp_path: Path) -> None:
    from ced_lightning.engines.comparison import train_and_compare
    from ced_lightning.engines.inputs import ensure_inputs
    from ced_lightning.engines.training import train
    from ced_lightning.train import entry_point

    cfg = compose_config(["data=custom", f"data.root={tmp_path}", "task=supervised"])
    assert entry_point(cfg) is train_and_compare  # no demo layer: nothing is generated or trained on its own
    with pytest.raises(
        FileNotFoundError, match=r"^data\.train: no store at .*train\.zarr.*ced_lightning\.prepare"
    ):
        train(cfg)
    assert list(tmp_path.iterdir()) == []
    # Each member of a list of training stores by its place in the list.
    cfg = compose_config(
        ["data=custom", f"data.root={tmp_path}", f"data.stores.distill=[{tmp_path}/a.zarr,{tmp_path}/b.zarr]"]
    )
    with pytest.raises(FileNotFoundError, match=r"^data\.train\[0\]: no store at .*a\.zarr"):
        ensure_inputs(cfg)
    for schedule_key in ("max_epochs", "epoch_length", "warmup_steps", "val_every", "patience", "mixup"):
        assert schedule_key in cfg.data.schedule


ONE_EPOCH = [
    "debug=limit",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def test_custom_data_trains_a_teacher_and_records_its_scaled_recipe(
    own: dict[str, str], tmp_path: Path
) -> None:
    from ced_lightning.engines.training import train

    out = tmp_path / "teacher"
    cfg = compose_config(
        _train_overrides(own, "task=supervised", *ONE_EPOCH, f"data.clip_seconds={CLIP_SECONDS}"), out
    )
    assert "test/mAP" in train(cfg)
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hparams["augment"]["time_mask_frames"] == 77 and hparams["data"]["clip_seconds"] == CLIP_SECONDS


def test_custom_data_distils_a_student_and_records_what_it_used(
    own: dict[str, str], logits: str, tmp_path: Path
) -> None:
    """The data group says 2 s (the augment group 192 frames, scaled); the student trains on the logit store's
    4 s clips and replays its 77-frame recipe: its saved configs say so."""
    from ced_lightning.engines.training import train

    out = tmp_path / "student"
    cfg = compose_config(_train_overrides(own, *ONE_EPOCH, "data.clip_seconds=2.0"), out)
    with read_write(cfg.hydra.runtime):  # as in a real run: Hydra's record of the config in the run folder
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig().set_config(cfg)
    (out / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), out / ".hydra" / "config.yaml"
    )
    assert "test/mAP" in train(cfg)
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hparams["data"]["clip_seconds"] == CLIP_SECONDS
    assert hparams["augment"]["time_mask_frames"] == 77 and hparams["augment"]["scale_to_clip"] is False
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.data.clip_seconds == CLIP_SECONDS and saved.augment.time_mask_frames == 77
    # The recorded recipe, read as a config again, is the one applied (absolute sizes, not scaled twice).
    assert AugmentRecipe.for_clip(saved.augment, CLIP_SECONDS) == LogitStore.open(logits).recipe


def test_custom_data_student_ends_with_the_table_and_its_label_only_row(
    own: dict[str, str], logits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data.label_only_baseline=true` on data=custom: the student's network trained with labels on the
    labeled store for as many optimizer steps (18 clips / 6 = 3 a student epoch, 12 / 6 = 2 a labeled one:
    2 student epochs = 3 labeled ones = 6 steps, each run validated once), then the table (the teacher that
    made the logit store, the ensemble, the student, the label-only row, chance) and the verdict lines."""
    from ced_lightning.train import entry_point

    schedule = ["data.batch_size=6", "data.schedule.max_epochs=2", "data.schedule.val_every=2"]
    cfg = compose_config(
        _train_overrides(own, *schedule, "data.label_only_baseline=true", "data.schedule.warmup_steps=2"),
        tmp_path / "student",
    )
    metrics = entry_point(cfg)(cfg)
    assert metrics["optimizer_steps"] == 6 and metrics["label_only/optimizer_steps"] == 6
    assert (tmp_path / "student" / "label_only" / "checkpoints").is_dir()
    out = capsys.readouterr().out
    assert "CED custom: mAP" in out
    rows = ["teacher teacher", "teacher ensemble", "student ced_tiny, label-free", "ced_tiny with labels"]
    for row in [*rows, "chance (mean label frequency)", "logit store / audio store"]:
        assert row in out, out
    assert "student against its best single teacher (teacher, " in out, out
    assert "student against the label-only baseline (" in out, out


def test_custom_data_evaluates_a_checkpoint_and_a_teacher_set(own: dict[str, str]) -> None:
    from ced_lightning.evaluate import run_evaluate

    # The test store of data=custom by default.
    cfg = compose_config(
        ["data=custom", f"data.root={own['root']}", f"ckpt={own['teacher']}", "output_dir=null"],
        config="evaluate",
    )
    assert cfg.store == own["test"]
    assert 0.0 <= run_evaluate(cfg)["mAP"] <= 1.0
    cfg = compose_config(
        [
            "data=custom",
            f"data.root={own['root']}",
            "teacher=ced",
            f"teacher.checkpoints=[{own['teacher']}]",
            "output_dir=null",
        ],
        config="evaluate",
    )
    assert "ensemble" in run_evaluate(cfg)


def test_custom_data_multirun(own: dict[str, str], logits: str, tmp_path: Path) -> None:
    args = [
        "-m",
        *_train_overrides(own, "debug=fdr", "test=false", f"paths.log_dir={tmp_path / 'logs'}"),
        "seed=1,2",
    ]
    result = run_command("train", *args, cwd=tmp_path, timeout=600, WANDB_MODE="offline")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted((tmp_path / "logs" / "debug" / "multiruns").glob("*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]


# -- top-k: every class of a small class list -------------------------------------------------------------


def test_topk_keeps_every_class_of_a_small_class_list_and_the_papers_20_of_large_ones() -> None:
    from ced_lightning.engines.extraction import default_topk, labels_beyond_topk

    assert [default_topk(n) for n in (2, 16, 32, 33, 527)] == [2, 16, 32, 20, 20]
    assert compose_config(["output=x"], config="extract").topk is None  # the rule, unless given
    assert compose_config(["data=demo"]).data.extract.topk == 5  # the demo's measured recipe stays
    counts = np.array([0, 0, 6, 1, 6, 5, 2])  # two unlabeled clips (a pool), five labeled
    assert labels_beyond_topk(counts, 5, 16) == (
        "2 of 5 labeled clips carry more than 5 labels (up to 6); topk=5 keeps at most 5 classes of each "
        "(use topk=16 to keep all)"
    )
    assert labels_beyond_topk(counts, 5, 527).endswith("(use topk=6 to keep all)")
    assert labels_beyond_topk(counts, 6, 16) is None and labels_beyond_topk(np.zeros(3, int), 1, 16) is None


def test_extract_stores_every_class_by_default_and_warns_when_clips_carry_more_labels(
    own: dict[str, str], logits: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.extract import run_extract

    def extract(output: str, *extra: str) -> LogitStore:
        overrides = [o for o in _extract_overrides(own, f"output={output}", *extra) if o != "topk=4"]
        return run_extract(compose_config(overrides, tmp_path / "run", config="extract"))

    assert extract(str(tmp_path / "all.zarr")).topk == len(DEMO_CLASSES)  # 16 classes: all of them
    assert extract(logits).topk == 4  # topk left out on a store made with topk=4: resumed as it was made
    counts = AudioStore.open(own["train"]).label_counts()
    assert (counts > 1).any() and caplog.text.count("labeled clips carry more than") == 0
    with caplog.at_level("WARNING", logger="ced_lightning.engines.extraction"):
        assert extract(str(tmp_path / "top1.zarr"), "topk=1").topk == 1
    expected = (
        f"{(counts > 1).sum()} of {len(counts)} labeled clips carry more than 1 labels (up to {counts.max()})"
    )
    assert expected in caplog.text


# -- where networks start: the released weights of their size ----------------------------------------


def test_custom_data_starts_ced_networks_from_the_released_weights_of_their_size() -> None:
    """data=custom starts each CED network (student or teacher) from the paper's released tagger of its size
    (a transformer from scratch learns nothing from a data set of this size); the demo keeps its own starts,
    and the demo student never starts from the demo's teacher on another data set."""
    custom = ["data=custom", "data.root=mine"]
    starts = {
        experiment: (cfg.model.init_from, cfg.model.get("init_strict"))
        for experiment in ("ced_tiny", "ced_mini", "teacher_ced", "teacher_demo_ced", "student_demo",
                           "teacher_demo_cnn", "paper_ced_mini")
        for cfg in [compose_config([f"experiment={experiment}", *custom])]
    }  # fmt: skip
    assert starts == {
        "ced_tiny": ("ced_tiny", True),
        "ced_mini": ("ced_mini", True),
        "teacher_ced": ("ced_base", True),
        "teacher_demo_ced": ("ced_tiny", False),  # 4 blocks: the file's first 4
        "student_demo": ("ced_tiny", False),
        "teacher_demo_cnn": (None, None),  # not a CED: no released weights
        "paper_ced_mini": ("ced_mini_mae", True),  # an experiment's own start wins
    }
    scratch = compose_config(["experiment=student_demo", *custom, "data.init_from=null"])
    assert scratch.model.init_from is None
    own_start = compose_config(["experiment=ced_tiny", *custom, "model.init_from=x.ckpt"])
    assert own_start.model.init_from == "x.ckpt"
    assert compose_config(["experiment=ced_tiny"]).model.init_from is None  # the demo: from scratch
    assert compose_config(["experiment=student_demo"]).model.init_from.endswith("demo/teachers/ced_tiny.ckpt")


def test_custom_data_start_loads_the_cached_release_offline_or_says_how_to_go_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ced_reference: Path
) -> None:
    import shutil

    import torch

    from ced_lightning.engines.training import build_network
    from ced_lightning.models import RELEASED, ReleasedWeightsUnavailable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["experiment=student_demo", "data=custom", "data.root=mine", "model.depth=4"])
    with pytest.raises(ReleasedWeightsUnavailable) as err:
        build_network(cfg, num_classes=len(DEMO_CLASSES))
    message = str(err.value)
    assert message.startswith("data.init_from=ced_tiny (data=custom's start for CED networks): released")
    assert "audiotransformer_tiny_mAP_4814.pt" in message and message.endswith("model.init_from=null")

    # The released CED-Tiny where torch.hub keeps it (a 2-block stand-in with random weights): the 4-block
    # student takes the blocks the file has, its head starts fresh for this data's classes.
    cached = RELEASED["ced_tiny"].torch_cache_path
    cached.parent.mkdir(parents=True)
    shutil.copy(ced_reference / "ced_tiny_depth2_random.pt", cached)
    released = torch.load(cached, weights_only=True)["model"]
    student = build_network(cfg, num_classes=len(DEMO_CLASSES))
    assert torch.equal(student.blocks[1].attn.qkv.weight, released["blocks.1.attn.qkv.weight"])
    assert torch.equal(student.patch_embed.proj.weight, released["patch_embed.proj.weight"])
    assert student.outputlayer[1].weight.shape[0] == len(DEMO_CLASSES)


# -- masks scaled to the clip length ---------------------------------------------------------------------


def test_time_masks_scale_with_the_clip_length_by_default() -> None:
    ced = compose_config(["data=custom"]).augment
    extract = compose_config(["output=x"], config="extract").augment  # no data group: scaled as well
    assert AugmentRecipe.for_clip(extract, 4.0).time_mask_frames == 77
    assert AugmentRecipe.for_clip(ced, 10.0) == AugmentRecipe()  # the paper's sizes at 10 s
    assert AugmentRecipe.for_clip(ced, 4.0).time_mask_frames == 77  # 4/10 of 192
    assert AugmentRecipe.for_clip(ced, 2.0).time_mask_frames == 38
    assert AugmentRecipe.for_clip(ced, 30.0).time_mask_frames == 255  # the stores' uint8 bound
    # Absolute sizes: the switch.
    absolute = compose_config(["data=custom", "augment.scale_to_clip=false"]).augment
    assert AugmentRecipe.for_clip(absolute, 4.0).time_mask_frames == 192
    # Shift, frequency masks and gain have no time extent to scale (shift_max is a fraction of the clip).
    scaled = scale_to_clip(AugmentRecipe(gain_db=3.0), 4.0)
    assert (scaled.shift_max, scaled.freq_mask_bins, scaled.gain_db) == (0.5, 24, 3.0)
    assert AugmentRecipe.for_clip(compose_config(["augment=none"]).augment, 4.0) == AugmentRecipe.from_config(
        compose_config(["augment=none"]).augment
    )


def test_the_demo_keeps_its_recipe() -> None:
    """The demo's explicit 40 frames stay absolute: its stores and numbers do not move."""
    cfg = compose_config(["data=demo"])
    from ced_lightning.demo import augment_overrides

    overrides = augment_overrides(cfg)
    extract = compose_config([*overrides, "output=x"], config="extract")
    assert AugmentRecipe.for_clip(extract.augment, float(cfg.data.clip_seconds)).time_mask_frames == 40
    teacher = compose_config(["experiment=teacher_demo_ced", *overrides])
    assert AugmentRecipe.for_clip(teacher.augment, float(teacher.data.clip_seconds)).time_mask_frames == 40
    # Any run on the demo's data keeps absolute sizes, as before scaling existed (a teacher trained by hand).
    by_hand = compose_config(["experiment=teacher_demo_ced", "augment.time_mask_frames=40"])
    assert AugmentRecipe.for_clip(by_hand.augment, 2.0).time_mask_frames == 40
    assert AugmentRecipe.for_clip(compose_config(["data=demo"]).augment, 2.0).time_mask_frames == 192
    assert AugmentRecipe.for_clip(compose_config(["data=custom"]).augment, 2.0).time_mask_frames == 38


def test_extraction_and_teachers_apply_the_scaled_masks(own: dict[str, str], logits: str) -> None:
    from ced_lightning.engines.training import build_task

    assert LogitStore.open(logits).recipe.time_mask_frames == 77
    cfg = compose_config(_train_overrides(own, "task=supervised", f"data.clip_seconds={CLIP_SECONDS}"))
    _, module = build_task(cfg)
    assert module.recipe.time_mask_frames == 77


# -- several stores read as one ------------------------------------------------------------------------------


def test_concat_view_reads_its_members_in_order(own: dict[str, str]) -> None:
    train, pool = AudioStore.open(own["train"]), AudioStore.open(own["unlabeled"])
    view = open_audio([own["train"], own["unlabeled"]])
    assert isinstance(view, ConcatAudioStore) and len(view) == len(train) + len(pool)
    assert isinstance(open_audio([own["train"]]), AudioStore)  # a list of one is that store
    n = len(train)
    np.testing.assert_array_equal(view.lengths, np.concatenate([train.lengths, pool.lengths]))
    both = view.read_clips(n - 2, n + 2, max_samples=1000)
    expected = [*train.read_clips(n - 2, n, max_samples=1000), *pool.read_clips(0, 2, max_samples=1000)]
    for got, want in zip(both, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(view.read_samples(n + 1), pool.read_samples(1))
    np.testing.assert_array_equal(view.read_clip_range(n, 100, 900), pool.read_samples(0)[100:900])
    spans = view.chunk_spans()
    assert spans[0] == 0 and spans[-1] == len(view) and n in spans  # no span crosses stores
    labels = view.label_matrix()
    np.testing.assert_array_equal(labels[:n], train.label_matrix())
    assert not labels[n:].any() and view.num_classes == train.num_classes and view.has_labels
    assert view.fingerprint not in (train.fingerprint, pool.fingerprint)
    # Another class list cannot join.
    with pytest.raises(ValueError, match="another class list"):
        ConcatAudioStore([train, _other_classes(Path(own["root"]) / "other.zarr")])


def _other_classes(url: Path) -> AudioStore:
    clip = generate_demo_clip(0, 0, 1.0)[0]
    return write_audio_store(str(url), [("x", clip, [0])], class_names=["a", "b"], source="other")


def test_logit_store_over_a_list_records_its_sources_and_refuses_another_list(
    own: dict[str, str], logits: str
) -> None:
    from ced_lightning.data.distill import DistillDataModule

    store = LogitStore.open(logits)
    train, pool = AudioStore.open(own["train"]), AudioStore.open(own["unlabeled"])
    assert store.num_clips == len(train) + len(pool)
    assert [(s["fingerprint"], s["num_clips"]) for s in store.audio_sources] == [
        (train.fingerprint, len(train)),
        (pool.fingerprint, len(pool)),
    ]
    data = DistillDataModule(train=[own["train"], own["unlabeled"]], logits=logits, num_workers=0)
    assert len(data.audio) == store.num_clips
    with pytest.raises(ValueError, match=r"made over 2 audio stores .*, not 1\)"):
        DistillDataModule(train=[own["train"]], logits=logits, num_workers=0)
    other = r"audio store 2 of 2 differs: .*unlabeled\.zarr.*'audio_store=\[.*val\.zarr\]'"
    with pytest.raises(ValueError, match=other):
        DistillDataModule(train=[own["train"], own["val"]], logits=logits, num_workers=0)


def test_extract_resumes_a_list_and_refuses_another(own: dict[str, str], logits: str, tmp_path: Path) -> None:
    from ced_lightning.extract import run_extract

    again = run_extract(
        compose_config(_extract_overrides(own), tmp_path, config="extract")
    )  # complete: resumes
    assert again.audio_fingerprint == LogitStore.open(logits).audio_fingerprint
    pool = f"data.stores.distill=[{own['train']},{own['val']}]"
    other = compose_config(_extract_overrides(own, pool=pool), tmp_path, config="extract")
    with pytest.raises(ValueError, match="audio_fingerprint"):
        run_extract(other)
