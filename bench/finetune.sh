#!/usr/bin/env bash
# Fine-tuning against a linear probe on the demo's single-label variant (bench/finetune.md).
#   bash bench/finetune.sh [FOLDER]    (default /tmp/ced_finetune; run from the repository root)
# A 4-block CED-Tiny trained with labels on the multi-label demo clips stands in for a released checkpoint
# (nothing to download); it is then fine-tuned and linear-probed on other clips of the single-label variant.
set -euo pipefail
D=${1:-/tmp/ced_finetune}
PY=${PY:-python}
common=(data=custom data.clip_seconds=2 data.num_workers=0 num_threads=2 logger=csv trainer=cpu)
$PY -m ced_lightning.prepare source=demo output=$D/pretrain demo.train=400 demo.unlabeled=0 demo.val=100 \
    demo.test=100 workers=1 hydra.run.dir=$D/runs/prepare_pretrain
$PY -m ced_lightning.prepare source=demo output=$D/single demo.seed=1 demo.single_label=true demo.train=320 \
    demo.unlabeled=0 demo.val=160 demo.test=320 workers=1 hydra.run.dir=$D/runs/prepare_single
# The stand-in for a released checkpoint: multi-label, 16 classes.
$PY -m ced_lightning.train experiment=teacher_demo_ced "${common[@]}" data.root=$D/pretrain model.init_from=null \
    data.schedule.max_epochs=10 data.schedule.val_every=5 hydra.run.dir=$D/runs/pretrain
start=$D/runs/pretrain/checkpoints/averaged.ckpt
for run in finetune probe; do
  extra=()
  [ $run = probe ] && extra=(optim.freeze_encoder=true)
  $PY -m ced_lightning.train experiment=finetune "${common[@]}" data.root=$D/single model=ced_tiny +model.depth=4 \
      model.init_from=$start task.objective=single_label data.schedule.max_epochs=8 data.schedule.warmup_steps=10 \
      "${extra[@]}" hydra.run.dir=$D/runs/$run
done
$PY - "$D" <<'PY'
import csv, sys
root = sys.argv[1]
print("| run | val/acc (best) | test/acc | test/top5_acc | test/mAP | train params |")
print("|---|---|---|---|---|---|")
for run in ("finetune", "probe"):
    rows = list(csv.DictReader(open(f"{root}/runs/{run}/csv/metrics.csv")))
    pick = lambda key: [float(r[key]) for r in rows if r.get(key)]
    test = {k: pick(k)[-1] for k in ("test/acc", "test/top5_acc", "test/mAP")}
    print(f"| {run} | {max(pick('val/acc')):.4f} | {test['test/acc']:.4f} | {test['test/top5_acc']:.4f} | "
          f"{test['test/mAP']:.4f} | {'head only' if run == 'probe' else 'all (encoder lr x0.1)'} |")
PY
