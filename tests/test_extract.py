"""End to end: a heterogeneous tiny ensemble (CED + timm CNN) over 40 one-second clips, E=2, k=5."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ced_lightning import conf_dir
from ced_lightning.core.audio import pack_clips
from ced_lightning.core.ensemble import check_teachers
from ced_lightning.data.blocks import BlockSampler, rank_share
from ced_lightning.models import TimmMelClassifier, create_ced, load_model, model_spec, save_ced
from ced_lightning.store.audio_writer import write_audio_store
from ced_lightning.store.logits import LogitStore
from conftest import command, command_env, run_command

C, N_CLIPS, K, E, BLOCK = 6, 40, 5, 2, 8
CLASSES = [f"class{i}" for i in range(C)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    clips = []
    for i in range(N_CLIPS):
        # Mostly 1 s, some shorter (zero-padded) and longer (cut) than clip_seconds=1.
        samples = int(16000 * (0.6 + 0.6 * (i % 3) / 2))
        t = np.arange(samples) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(samples)
        clips.append((f"clip{i:02d}", wave.astype(np.float32), [i % C]))
    write_audio_store(root / "audio.zarr", clips, class_names=CLASSES)
    write_audio_store(root / "other_audio.zarr", clips[:-1], class_names=CLASSES)
    write_audio_store(root / "small_audio.zarr", clips[:4], class_names=CLASSES)

    torch.manual_seed(0)
    ced = create_ced("ced_tiny", depth=1, num_classes=C)
    save_ced(ced.eval(), root / "ced_tiny.pt")
    cnn = TimmMelClassifier("mobilenetv3_small_050", num_classes=C).eval()
    torch.save(
        {
            "model_spec": model_spec(cnn),
            "class_names": CLASSES,
            "state_dict": {f"model.{k}": v for k, v in cnn.state_dict().items()},
        },
        root / "mobilenet.ckpt",
    )
    assert isinstance(load_model(root / "mobilenet.ckpt"), TimmMelClassifier)
    return root


def _overrides(root: Path, output: str, *extra: str) -> list[str]:
    return [
        f"audio_store={root / 'audio.zarr'}",
        f"output={output}",
        f"paths.root_dir={root}",
        f"teacher.members=[{{name: ced_tiny, checkpoint: {root / 'ced_tiny.pt'}}},"
        f"{{name: mobilenet, checkpoint: {root / 'mobilenet.ckpt'}}}]",
        f"epochs={E}",
        f"topk={K}",
        "quantization=float16",
        "clip_seconds=1.0",
        f"block_clips={BLOCK}",
        "micro_batch_size=3",
        "num_workers=0",
        "seed=7",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def _cfg(root: Path, output: str, *extra: str) -> DictConfig:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("extract", overrides=_overrides(root, output, *extra))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The 2-process run uses one thread per process and so does everything here: float sums then agree bit
    # for bit, and tiny models on a shared CPU run faster without a second spinning OpenMP thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(workdir: Path, one_thread: None) -> LogitStore:
    from ced_lightning.extract import run_extract

    return run_extract(_cfg(workdir, str(workdir / "reference.zarr"), "verify=12"))


def _assert_same_store(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    names = ["topk_indices", "topk_values", "block_done", *(f"params/{n}" for n in ga["params"].array_keys())]
    for name in names:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    for key in ("teachers", "augment_recipe", "quantization", "audio_fingerprint", "class_names"):
        assert ga.attrs[key] == gb.attrs[key]


def test_heterogeneous_ensemble_extracts_and_verifies(reference: LogitStore, workdir: Path) -> None:
    store = LogitStore.open(reference.url)
    assert store.is_complete() and len(store) == N_CLIPS and store.num_blocks == 5
    assert store.class_names == CLASSES and store.clip_samples == 16000
    assert [t["name"] for t in store.teachers] == ["ced_tiny", "mobilenet"]
    assert all(len(t["sha256"]) == 64 for t in store.teachers)
    epoch = store.read_epoch(1)
    assert epoch.indices.shape == (N_CLIPS, K) and (np.diff(epoch.probs, axis=1) <= 0).all()
    assert ((epoch.probs > 0) & (epoch.probs < 1)).all()
    # Epochs differ (other augmentation draws), so do their top-k probabilities.
    assert not np.array_equal(store.read_epoch(0).probs, epoch.probs)
    stats = (workdir / "reference.zarr" / "extract_stats.json").read_text()
    assert '"bytes_per_clip_epoch"' in stats and '"clips_per_s"' in stats
    assert json.loads(stats)["steady_clips_per_s"] > 0
    assert '"ok": true' in stats, stats


def test_verify_detects_tampering(reference: LogitStore, workdir: Path) -> None:
    from ced_lightning.engines.teachers import load_teachers
    from ced_lightning.engines.verify import verify_store
    from ced_lightning.store.audio import AudioStore

    cfg = _cfg(workdir, reference.url)
    teachers, _, _ = load_teachers(cfg.teacher)
    audio = AudioStore.open(str(workdir / "audio.zarr"))
    ok = verify_store(reference, teachers, audio, samples=6, seed=1)
    assert ok["ok"] and ok["max_abs_diff"] <= ok["bound"] and ok["topk_set_agreement"] == 1.0
    # A store whose values were shifted is caught.
    tampered = str(workdir / "tampered.zarr")
    src, dst = zarr.open_group(reference.url, mode="r"), zarr.open_group(tampered, mode="w")
    dst.attrs.update(dict(src.attrs))
    for name in [
        "topk_indices",
        "topk_values",
        "block_done",
        *(f"params/{n}" for n in src["params"].array_keys()),
    ]:
        data = src[name][:]
        if name == "topk_values":
            data = (data.astype(np.float32) * 0.9).astype(np.float16)
        dst.create_array(name, data=data, chunks=src[name].chunks)
    bad = verify_store(LogitStore.open(tampered), teachers, audio, samples=6, seed=1)
    assert not bad["ok"] and bad["max_abs_diff"] > bad["bound"]


def test_resume_after_interruption_equals_uninterrupted(reference: LogitStore, workdir: Path) -> None:
    from ced_lightning.extract import run_extract

    out = str(workdir / "resumed.zarr")
    partial = run_extract(_cfg(workdir, out, "limit_blocks=2"))
    assert partial.missing_blocks() == [2, 3, 4]
    # The interrupted store still refuses to be read as a whole.
    with pytest.raises(ValueError, match="incomplete"):
        partial.read_epoch(0)
    # What zarr's LocalStore (>= 3.1.3) leaves when killed between writing a shard and renaming it into place.
    leftover = Path(out) / "topk_values" / "c" / "0" / "2" / f"0.{'5e' * 16}.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a shard")
    assert not Path(f"{out}.lock").exists()  # released when the first run ended
    run_extract(_cfg(workdir, out))
    _assert_same_store(reference.url, out)
    assert not leftover.exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["topk=4"], "topk"),
        (["quantization=int8"], "quantization"),
        (["augment.time_masks=2"], "augment_recipe"),
        (["seed=8"], "seed"),
        (["clip_seconds=0.5"], "clip_samples"),
    ],
)
def test_mismatch_refused(reference: LogitStore, workdir: Path, extra: list[str], named: str) -> None:
    from ced_lightning.extract import run_extract

    with pytest.raises(ValueError, match=rf"(?s)other settings:.*{named}: stored"):
        run_extract(_cfg(workdir, reference.url, *extra))


def test_mismatch_refused_other_teachers_and_audio(reference: LogitStore, workdir: Path) -> None:
    from ced_lightning.extract import run_extract

    cfg = _cfg(
        workdir, reference.url, f"teacher.members=[{{name: ced_tiny, checkpoint: {workdir / 'ced_tiny.pt'}}}]"
    )
    with pytest.raises(ValueError, match=r"(?s)teachers: stored .*mobilenet"):
        run_extract(cfg)
    cfg = _cfg(workdir, reference.url, f"audio_store={workdir / 'other_audio.zarr'}")
    with pytest.raises(
        ValueError, match=r"(?s)audio_fingerprint: stored.*num_clips: stored 40, requested 39"
    ):
        run_extract(cfg)
    assert not Path(f"{reference.url}.lock").exists()  # released after the exception


def test_failed_verification_exits_non_zero(reference: LogitStore, workdir: Path) -> None:
    """The real command, verifying (only) a complete store whose values were altered: exit status 1 (it
    printed MISMATCH and exited 0 before)."""
    import shutil

    tampered = workdir / "tampered_copy.zarr"
    shutil.copytree(reference.url, tampered)
    values = zarr.open_group(str(tampered), mode="r+")["topk_values"]
    values[:] = (values[:].astype(np.float32) * 0.9).astype(np.float16)
    overrides = _overrides(workdir, str(tampered), "verify=6", f"hydra.run.dir={workdir / 'verify_run'}")
    done = run_command("extract", *overrides, cwd=workdir)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-3000:]
    assert "-> MISMATCH" in done.stdout and "verification failed" in said, said[-3000:]
    assert json.loads((tampered / "extract_stats.json").read_text())["verify"]["ok"] is False


def test_stats_kept_inside_the_store_user_file_untouched(workdir: Path) -> None:
    from ced_lightning.extract import run_extract

    out = workdir / "beside_user_file.zarr"
    users = Path(f"{out}.stats.json")  # a name the old code wrote its figures to
    users.write_text("the user's own notes")
    run_extract(_cfg(workdir, str(out), f"audio_store={workdir / 'small_audio.zarr'}", "epochs=1"))
    assert users.read_text() == "the user's own notes"
    assert json.loads((out / "extract_stats.json").read_text())["complete"] is True


def test_output_inside_the_audio_store_refused(workdir: Path) -> None:
    from ced_lightning.extract import run_extract

    audio = workdir / "small_audio.zarr"
    before = sorted(p.relative_to(audio) for p in audio.rglob("*"))
    with pytest.raises(FileExistsError, match=r"lies inside the Zarr store or group at .*small_audio\.zarr"):
        run_extract(_cfg(workdir, str(audio / "logits"), f"audio_store={audio}", "epochs=1"))
    assert sorted(p.relative_to(audio) for p in audio.rglob("*")) == before  # not even a lock file


@pytest.mark.slow
def test_two_extract_commands_on_one_new_output(reference: LogitStore, workdir: Path) -> None:
    """Two real `extract` processes on the same new output: the second is refused naming the first (it died
    with zarr's ContainsArrayError or emptied the first's store before), which completes undisturbed."""
    import time

    out = workdir / "contested.zarr"
    first = subprocess.Popen(
        command(
            "extract",
            *_overrides(workdir, str(out), "throttle_s=4.0", f"hydra.run.dir={workdir / 'first_run'}"),
        ),
        env=command_env(),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{out}.lock").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        second = run_command(
            "extract", *_overrides(workdir, str(out), f"hydra.run.dir={workdir / 'second_run'}"), cwd=workdir
        )
        assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
        said = second.stdout + second.stderr
        assert second.returncode == 1, said[-3000:]
        assert f"being written by another run (pid {first.pid} on host" in said, said[-3000:]
        log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log[-3000:]
    _assert_same_store(reference.url, str(out))
    assert not Path(f"{out}.lock").exists()


def test_bad_combine_refused_before_any_store_exists(workdir: Path) -> None:
    from ced_lightning.extract import run_extract
    from ced_lightning.store import store_exists

    out = str(workdir / "typo.zarr")
    with pytest.raises(ValueError, match=r"teacher\.combine must be one of .*'mean_probs'"):
        run_extract(_cfg(workdir, out, "teacher.combine=mean_probs"))
    assert not store_exists(out)  # so the corrected command is not refused


def _extract_with_two_processes(workdir: Path, out: str, run_dir: str) -> str:
    """The real command with trainer.devices=2 (DDP on the CPU with gloo); returns its stdout."""
    overrides = _overrides(
        workdir, out, "trainer.devices=2", "strategy=ddp", f"hydra.run.dir={workdir / run_dir}"
    )
    done = run_command("extract", *overrides, cwd=workdir, PYTHONUNBUFFERED="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(reference: LogitStore, workdir: Path) -> None:
    out = str(workdir / "ddp.zarr")
    assert "devices: 2" in _extract_with_two_processes(workdir, out, "ddp_run")
    _assert_same_store(reference.url, out)
    # Both ranks wrote two blocks or more: their rates after the first block, summed.
    assert json.loads((Path(out) / "extract_stats.json").read_text())["steady_clips_per_s"] > 0

    # Finishing one missing block with two processes: rank 0's share is empty, and Lightning skips its whole
    # prediction loop; the ranks must still meet and finish (this hung, or rank 0 reported missing blocks).
    from ced_lightning.extract import run_extract

    last = str(workdir / "ddp_last_block.zarr")
    assert run_extract(_cfg(workdir, last, "limit_blocks=4")).missing_blocks() == [4]
    _extract_with_two_processes(workdir, last, "ddp_run2")
    _assert_same_store(reference.url, last)


def test_block_sampler_shares_are_disjoint_and_contiguous() -> None:
    blocks = [1, 2, 3, 5, 8, 9, 10]
    shares = [rank_share(blocks, 3, r) for r in range(3)]
    assert [b for share in shares for b in share] == blocks and [len(s) for s in shares] == [2, 3, 2]
    assert list(BlockSampler(blocks, 3, 1)) == [3, 5, 8]
    assert rank_share([4], 2, 0) + rank_share([4], 2, 1) == [4]
    assert list(BlockSampler([4], 2, 0)) == [] and list(BlockSampler([4], 2, 1)) == [4]
    with pytest.raises(ValueError, match="rank 2 out of range"):
        rank_share(blocks, 2, 2)


def test_pack_clips_cuts_and_pads() -> None:
    flat = np.arange(1, 11, dtype=np.int16)
    wave, lengths = pack_clips([flat[0:3], flat[3:10]], 5)
    np.testing.assert_array_equal(wave, [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(lengths, [3, 5])
    out = np.full((2, 4), 99, dtype=np.int16)  # into a given buffer, from given starts, garbage overwritten
    wave, lengths = pack_clips([flat[0:3], flat[3:10]], 4, starts=np.array([1, 5]), out=out)
    assert wave is out
    np.testing.assert_array_equal(wave, [[2, 3, 0, 0], [9, 10, 0, 0]])
    np.testing.assert_array_equal(lengths, [2, 2])


def test_teachers_with_different_class_counts_refused() -> None:
    a, b = create_ced("ced_tiny", depth=1, num_classes=3), create_ced("ced_tiny", depth=1, num_classes=4)
    with pytest.raises(ValueError, match="different numbers of classes"):
        check_teachers([a, b], ["a", "b"])
    with pytest.raises(TypeError, match="forward_spectrogram"):
        check_teachers([torch.nn.Linear(2, 2)])


def test_bf16_mixed_extraction_verifies(reference: LogitStore, workdir: Path) -> None:
    # What GPUs run (bf16 autocast, float32 front end), here on the CPU (slow there: 4 clips, 1 epoch): it
    # works and replays within bf16 slack. Each block's `block_done` code records the precision, so a later
    # float32 run verifies the store with bf16's tolerance (and a float32 store keeps the tight one).
    from ced_lightning.core.quantize import max_abs_error
    from ced_lightning.engines.teachers import load_teachers
    from ced_lightning.engines.verify import REPLAY_SLACK, verify_store
    from ced_lightning.extract import run_extract
    from ced_lightning.store.audio import AudioStore
    from ced_lightning.store.logits import BLOCK_FULL_PRECISION, BLOCK_REDUCED_PRECISION

    out = workdir / "bf16.zarr"
    small = f"audio_store={workdir / 'small_audio.zarr'}"
    store = run_extract(
        _cfg(workdir, str(out), small, "trainer.precision=bf16-mixed", "epochs=1", "verify=4")
    )
    assert store.is_complete()
    stats = (out / "extract_stats.json").read_text()
    assert '"precision": "bf16-mixed"' in stats and '"ok": true' in stats, stats
    assert store.block_codes().tolist() == [BLOCK_REDUCED_PRECISION]
    assert set(reference.block_codes().tolist()) == {BLOCK_FULL_PRECISION}

    teachers, _, _ = load_teachers(_cfg(workdir, str(out)).teacher)  # float32, as a later CPU run has them
    replay = verify_store(store, teachers, AudioStore.open(str(workdir / "small_audio.zarr")), 4, seed=2)
    assert replay["ok"], replay
    # ... which a float32 tolerance would have called a mismatch.
    assert replay["max_abs_diff"] > max_abs_error(1.0, "float16") + REPLAY_SLACK[False], replay


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_uninterrupted(reference: LogitStore, workdir: Path) -> None:
    """The real command, killed with SIGKILL after some blocks (one possibly half written), then run again."""
    import signal
    import time

    out = str(workdir / "killed.zarr")
    overrides = _overrides(workdir, out, f"hydra.run.dir={workdir}")
    proc = subprocess.Popen(
        command("extract", *overrides, "throttle_s=1.0"),
        env=command_env(),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                done = int(zarr.open_group(out, mode="r")["block_done"][:].sum())
            except Exception:  # the store is not created yet
                continue
            if done >= 2:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = LogitStore.open(out)
    assert 2 <= partial.num_blocks - len(partial.missing_blocks()) < partial.num_blocks
    rerun = run_command("extract", *overrides, cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_store(reference.url, out)


def test_non_finite_teacher_output_names_the_teacher_and_clips() -> None:
    from ced_lightning.core.augment import AugmentRecipe
    from ced_lightning.modules.ensemble import TeacherEnsembleModule

    torch.manual_seed(0)
    good, broken = (create_ced("ced_tiny", depth=1, num_classes=C).eval() for _ in range(2))
    with torch.no_grad():
        broken.outputlayer[1].bias[2] = float("nan")  # e.g. a checkpoint that overflowed in training
    module = TeacherEnsembleModule(
        [good, broken],
        store_url="unused",
        recipe=AugmentRecipe(),
        seed=0,
        epochs=1,
        topk=3,
        micro_batch_size=2,
        teacher_names=["good", "broken"],
    )
    rng = np.random.default_rng(0)
    batch = {
        "block": 3,
        "index": torch.arange(24, 27),
        "waveform": torch.from_numpy(rng.integers(-3000, 3000, (3, 16000), dtype=np.int16)),
        "length": torch.full((3,), 16000),
    }
    with pytest.raises(
        ValueError, match=r"teacher broken .* clips \[24, 25\] \(augmentation epoch 0\).*\(3\)"
    ):
        module.block_topk(batch)


def test_clips_shorter_than_one_stft_window_extract(workdir: Path) -> None:
    """The short-clip rule in extraction: 200-sample clips, and crops of 0.02 s (320 samples: under CED's
    512-point window and the CNN's 1024). Before, the front end's reflect padding raised `RuntimeError: ...
    Padding size should be less than the corresponding input dimension` for the crops."""
    from ced_lightning.extract import run_extract

    rng = np.random.default_rng(5)
    clips = [(f"blip{i}", (0.2 * rng.standard_normal(200)).astype(np.float32), [i % C]) for i in range(6)]
    write_audio_store(workdir / "short_audio.zarr", clips, class_names=CLASSES)
    for clip_seconds in (1.0, 0.02):
        out = str(workdir / f"short_logits_{clip_seconds}.zarr")
        overrides = [o for o in _overrides(workdir, out, "verify=6") if not o.startswith("clip_seconds")]
        overrides[0] = f"audio_store={workdir / 'short_audio.zarr'}"
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("extract", overrides=[*overrides, f"clip_seconds={clip_seconds}"])
        store = run_extract(cfg)  # verify=6 recomputes every clip and compares
        assert store.is_complete()
        indices, values, _ = store.read(E - 1, 5)
        assert len(indices) == K and np.isfinite(values).all()


def test_credentials_in_urls_stay_out_of_the_store(workdir: Path) -> None:
    """Audio store and teacher checkpoint given by URLs with credentials: the logit store records them
    redacted (it recorded both verbatim before)."""
    import fsspec

    from ced_lightning.extract import run_extract

    secret = "s3cretValue"
    fs = fsspec.filesystem("memory")
    audio_url = f"memory://AKIAKEY:{secret}@bucket/small_audio.zarr"
    fs.put(str(workdir / "small_audio.zarr"), f"/AKIAKEY:{secret}@bucket/small_audio.zarr", recursive=True)
    checkpoint = f"memory://creds/ced_tiny.pt?token={secret}"  # a presigned-style URL
    fs.put(str(workdir / "ced_tiny.pt"), f"/creds/ced_tiny.pt?token={secret}")
    out = workdir / "from_urls.zarr"
    cfg = _cfg(
        workdir,
        str(out),
        f"audio_store='{audio_url}'",
        f"teacher.members=[{{name: ced_tiny, checkpoint: '{checkpoint}'}}]",
        "epochs=1",
    )
    store = run_extract(cfg)
    assert store.attrs["audio_store"] == "memory://***@bucket/small_audio.zarr"
    assert store.teachers[0]["checkpoint"] == "memory://creds/ced_tiny.pt?token=***"
    assert secret not in (out / "zarr.json").read_text() + (out / "extract_stats.json").read_text()


# --- segments: long recordings teach on all their audio --------------------------------------------------
# Seconds per clip and (clip_seconds=1) segments: 3.7 s -> 4 (the 0.7 s rest kept), 2.4 s -> 2 (0.4 s left
# out), 1.6 s -> 2, 5 s -> 5; the rest one each. 18 rows over 9 clips: 3 blocks of 8.
LONG_SECONDS = [1.0, 3.7, 0.3, 2.4, 1.0, 5.0, 0.8, 1.6, 1.0]
LONG_STARTS = [[0], [0, 1, 2, 3], [0], [0, 1], [0], [0, 1, 2, 3, 4], [0], [0, 1], [0]]


@pytest.fixture(scope="module")
def long_audio(workdir: Path) -> str:
    rng = np.random.default_rng(1)
    clips = []
    for i, seconds in enumerate(LONG_SECONDS):
        samples = round(16000 * seconds)
        t = np.arange(samples) / 16000
        # The pitch rises through the clip: every segment of a long clip sounds different.
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t * (1 + t / 4)) + 0.05 * rng.standard_normal(
            samples
        )
        clips.append((f"long{i}", wave.astype(np.float32), [i % C]))
    url = workdir / "long_audio.zarr"
    write_audio_store(url, clips, class_names=CLASSES)
    return str(url)


@pytest.fixture(scope="module")
def segment_reference(workdir: Path, long_audio: str, one_thread: None) -> LogitStore:
    from ced_lightning.extract import run_extract

    return run_extract(
        _cfg(workdir, str(workdir / "segments.zarr"), f"audio_store={long_audio}", "verify=36")
    )


def _assert_same_segments(a: str, b: str) -> None:
    _assert_same_store(a, b)
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ("segment_clip", "segment_start"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["segment_samples"] == gb.attrs["segment_samples"]


def test_long_clips_extract_every_segment(
    segment_reference: LogitStore, workdir: Path, long_audio: str
) -> None:
    """Every segment of every clip is a row (the last partial one when at least half a segment), each row's
    teachers' probabilities are those of its own stretch of audio, and the figures count segments."""
    from ced_lightning.core.ensemble import ensemble_probabilities
    from ced_lightning.engines.teachers import load_teachers
    from ced_lightning.store.audio import AudioStore

    store = LogitStore.open(segment_reference.url)
    rows = [(c, 16000 * s) for c, starts in enumerate(LONG_STARTS) for s in starts]
    assert store.is_complete() and len(store) == len(rows) == 18 and store.num_clips == 9
    assert store.segment_samples == 16000 and store.num_blocks == 3
    table = store.segments()
    assert list(zip(table.clip.tolist(), table.start.tolist(), strict=True)) == rows
    stats = json.loads((Path(segment_reference.url) / "extract_stats.json").read_text())
    assert stats["verify"]["ok"] and stats["verify"]["samples"] == 36  # every (epoch, row) replayed
    assert stats["num_clips"] == stats["clips_extracted"] == 9
    assert stats["num_segments"] == stats["segments_extracted"] == 18 and stats["segment_seconds"] == 1.0

    # Independently of the store's read path: row 10 is the 5 s clip's second segment (1 s to 2 s).
    audio = AudioStore.open(long_audio)
    teachers, _, _ = load_teachers(_cfg(workdir, store.url).teacher)
    row = 10
    assert (int(table.clip[row]), int(table.start[row])) == (5, 16000)
    wave = torch.from_numpy(audio.read_samples(5)[16000:32000].astype(np.float32) / 32768.0)[None]
    for epoch in range(E):
        classes, stored, params = store.read(epoch, row)
        with torch.no_grad():
            probs = ensemble_probabilities(
                teachers,
                wave,
                torch.tensor([16000]),
                params,
                store.recipe,
                store.combine,
            )[0].numpy()
        assert np.abs(probs[classes] - stored).max() < 1e-3
    # Other stretches of the same clip give other targets.
    assert not np.array_equal(store.read(0, 9)[1], store.read(0, 10)[1])


def test_clips_that_fit_one_segment_store_no_positions(reference: LogitStore) -> None:
    """The stores of before: clips that fit one segment give one row per clip and no position arrays (the
    demo's stores are unchanged), and such a store reads as one segment per clip at 0."""
    group = zarr.open_group(reference.url, mode="r")
    assert "segment_clip" not in group and "segment_samples" not in group.attrs
    table = LogitStore.open(reference.url).segments()
    assert table.clip.tolist() == list(range(N_CLIPS)) and (table.start == 0).all()


def test_segment_store_resume_after_interruption_equals_uninterrupted(
    segment_reference: LogitStore, workdir: Path, long_audio: str
) -> None:
    from ced_lightning.extract import run_extract

    out = str(workdir / "segments_resumed.zarr")
    partial = run_extract(_cfg(workdir, out, f"audio_store={long_audio}", "limit_blocks=1"))
    assert partial.missing_blocks() == [1, 2]
    run_extract(_cfg(workdir, out, f"audio_store={long_audio}"))
    _assert_same_segments(segment_reference.url, out)
    # Another segment length is another extraction.
    with pytest.raises(
        ValueError, match=r"(?s)other settings:.*segment_samples: stored 16000, requested 8000"
    ):
        run_extract(_cfg(workdir, out, f"audio_store={long_audio}", "segment_seconds=0.5"))
    with pytest.raises(ValueError, match="segment_seconds must be > 0 and at most clip_seconds"):
        run_extract(
            _cfg(workdir, str(workdir / "too_long.zarr"), f"audio_store={long_audio}", "segment_seconds=2")
        )


def test_store_begun_before_segments_resumes_its_own_layout(
    workdir: Path, long_audio: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial store of long clips begun before segments (one row per clip, no positions) is finished that
    way by a plain rerun, with a warning; asking for segments on it is refused."""
    import ced_lightning.engines.extraction as extraction
    from ced_lightning.extract import run_extract
    from ced_lightning.store.segments import SegmentTable

    out = str(workdir / "before_segments.zarr")
    with monkeypatch.context() as patch:  # the code of before: one row per clip
        patch.setattr(
            extraction, "segment_table", lambda lengths, s: SegmentTable.one_per_clip(len(lengths), s)
        )
        partial = run_extract(
            _cfg(workdir, out, f"audio_store={long_audio}", "block_clips=4", "limit_blocks=1")
        )
    assert "segment_samples" not in partial.attrs and partial.missing_blocks() == [1, 2]
    with pytest.raises(ValueError, match=r"segment_samples: stored None, requested 16000"):
        run_extract(_cfg(workdir, out, f"audio_store={long_audio}", "block_clips=4", "segment_seconds=1"))
    store = run_extract(_cfg(workdir, out, f"audio_store={long_audio}", "block_clips=4", "verify=6"))
    assert store.is_complete() and len(store) == 9 and store.segment_samples is None
    assert json.loads((Path(out) / "extract_stats.json").read_text())["verify"]["ok"]


@pytest.mark.slow
def test_segment_store_two_processes_equal_one(
    segment_reference: LogitStore, workdir: Path, long_audio: str
) -> None:
    out = str(workdir / "segments_ddp.zarr")
    overrides = _overrides(
        workdir, out, "trainer.devices=2", "strategy=ddp", f"hydra.run.dir={workdir / 'segments_ddp_run'}"
    )
    overrides[0] = f"audio_store={long_audio}"
    done = run_command("extract", *overrides, cwd=workdir, PYTHONUNBUFFERED="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "devices: 2" in done.stdout and "(18 segments of 1 s)" in done.stdout
    _assert_same_segments(segment_reference.url, out)


def test_student_reads_each_segment_as_the_teachers_did(
    segment_reference: LogitStore, long_audio: str
) -> None:
    """Through the distillation data path: every row of an epoch, segments beyond a clip's first included,
    arrives with its own stretch of audio, and the student's augmented spectrogram of it is bit-identical to
    the teacher-side one built from that stretch and the stored parameters; a segment's labels are its
    clip's."""
    from ced_lightning.core.augment import AugmentParams, augmented_spectrogram
    from ced_lightning.data.distill import DistillDataModule
    from ced_lightning.store.audio import AudioStore

    data = DistillDataModule(
        train=long_audio, logits=segment_reference.url, batch_size=3, num_workers=0, with_labels=True
    )
    logits, audio = LogitStore.open(segment_reference.url), AudioStore.open(long_audio)
    table = logits.segments()

    class _Trainer:  # what the data module reads from Lightning's Trainer
        current_epoch, global_rank, world_size = 3, 0, 1

    data.trainer = _Trainer()
    front_end = create_ced("ced_tiny", depth=1, num_classes=C).front_end
    seen = []
    for batch in data.train_dataloader():
        batch = data.on_after_batch_transfer(batch, 0)
        params = AugmentParams.from_torch(batch["augment"])
        mel = augmented_spectrogram(front_end, batch["waveform"], batch["length"], params, logits.recipe)
        for pos, row in enumerate(batch["index"].tolist()):
            clip, start = int(table.clip[row]), int(table.start[row])
            piece = audio.read(clip)[start : start + 16000]
            wave = torch.zeros(1, 16000)
            wave[0, : len(piece)] = piece
            _, probs, stored = logits.read(3 % E, row)
            teacher_side = augmented_spectrogram(
                front_end, wave, torch.tensor([len(piece)]), stored, logits.recipe
            )
            assert torch.equal(mel[pos], teacher_side[0]), row
            assert params.subset(np.array([pos])) == stored
            assert torch.equal(batch["topk_probs"][pos], torch.from_numpy(probs))
            assert batch["target"][pos].nonzero().flatten().tolist() == [clip % C]
            seen.append((clip, start))
    assert len(seen) == 18 // 3 * 3 and len(set(seen)) == len(seen)
    assert {(5, 64000), (1, 48000)} <= set(seen)  # the 5 s clip's last segment, the 3.7 s clip's kept rest
