#!/usr/bin/env bash
# docs/own_data.md, "When distillation pays off": the guide's commands on a data set shaped like a user's
# (generated, so anyone can rerun it): 16 classes, 4 s clips recorded at 8 kHz (prepare resamples them to
# 16 kHz), 800 labeled clips (a TSV list), 200 validation and 400 test clips (CSV lists), and a pool of 1,200
# unlabeled ones. Teachers and students from scratch (no released weights offline), then the student again
# from the strongest teacher of its own architecture (`model.init_from=teacher`); each student with its
# label-only row. Each run's table is in its log; bench/own_data.md has the figures.
#
#   bash bench/own_data.sh [WORKDIR]        # about 45 minutes on a 2-core CPU
set -euo pipefail
W=${1:-own_data_run}
PY=${PYTHON:-python}
mkdir -p "$W"
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$W/stages.log"; }

stamp "clips"
"$PY" - "$W" <<'EOF'
import csv
import sys
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as F

from ced_lightning.data.demo import DEMO_CLASSES, generate_demo_clip

root = Path(sys.argv[1])
with open(root / "classes.csv", "w", newline="") as f:
    csv.writer(f).writerows([("index", "mid", "display_name"), *((i, f"/own/{n}", n) for i, n in enumerate(DEMO_CLASSES))])
index = 0
for split, count in {"train": 800, "val": 200, "test": 400, "unlabeled": 1200}.items():
    folder = root / "audio" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        waveform, labels = generate_demo_clip(seed=7, index=index, clip_seconds=4.0)
        index += 1
        at_8k = F.resample(torch.as_tensor(waveform, dtype=torch.float32), 16000, 8000).numpy()
        sf.write(folder / f"{i:04d}.wav", at_8k, 8000, subtype="PCM_16")
        rows.append((f"audio/{split}/{i:04d}.wav", ";".join(map(str, labels))))  # relative to the list's folder
    if split == "train":
        with open(root / "train.tsv", "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows([("filename", "labels"), *rows])
    elif split != "unlabeled":
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "labels"), *rows])
EOF

stamp "prepare"
"$PY" -m ced_lightning.prepare input="$W/train.tsv" class_labels="$W/classes.csv" output="$W/stores/train.zarr" workers=2
for split in val test; do
  "$PY" -m ced_lightning.prepare input="$W/$split.csv" class_labels="$W/classes.csv" output="$W/stores/$split.zarr" workers=2
done
"$PY" -m ced_lightning.prepare input="$W/audio/unlabeled" output="$W/stores/unlabeled.zarr" workers=2

DATA=(data=custom "data.root=$W/stores" data.clip_seconds=4 data.init_from=null)
POOL='data.stores.distill=[${data.root}/train.zarr,${data.root}/unlabeled.zarr]'

# Teachers: 800 clips / 32 = 25 steps an epoch.
stamp "teacher ced_tiny (4 blocks), 24 epochs = 600 steps"
"$PY" -m ced_lightning.train experiment=teacher_demo_ced "${DATA[@]}" data.schedule.max_epochs=24 \
    data.schedule.warmup_steps=50 hydra.run.dir="$W/runs/teacher_ced"
stamp "teacher mobilenet, 10 epochs = 250 steps"
"$PY" -m ced_lightning.train experiment=teacher_demo_cnn "${DATA[@]}" data.schedule.max_epochs=10 \
    data.schedule.warmup_steps=25 hydra.run.dir="$W/runs/teacher_cnn"
mkdir -p "$W/teachers"
cp "$W/runs/teacher_ced/checkpoints/averaged.ckpt" "$W/teachers/ced_tiny.ckpt"
cp "$W/runs/teacher_cnn/checkpoints/averaged.ckpt" "$W/teachers/mobilenet.ckpt"

stamp "extract: 2,000 clips x 3 epochs"
"$PY" -m ced_lightning.extract "${DATA[@]}" "$POOL" teacher=ced \
    "teacher.checkpoints=[$W/teachers/ced_tiny.ckpt,$W/teachers/mobilenet.ckpt]" epochs=3

# Students: 2,000 clips / 32 = 62 steps an epoch; the label-only row takes as many steps over the 800.
stamp "student from scratch, 10 epochs = 620 steps, and its label-only row"
"$PY" -m ced_lightning.train experiment=student_demo "${DATA[@]}" "$POOL" data.schedule.max_epochs=10 \
    data.schedule.warmup_steps=50 data.label_only_baseline=true hydra.run.dir="$W/runs/student_scratch"
stamp "student from its CED teacher (model.init_from=teacher), and its label-only row"
"$PY" -m ced_lightning.train experiment=student_demo "${DATA[@]}" "$POOL" data.schedule.max_epochs=10 \
    data.schedule.warmup_steps=50 data.label_only_baseline=true model.init_from=teacher \
    hydra.run.dir="$W/runs/student_teacher"
stamp "done"
