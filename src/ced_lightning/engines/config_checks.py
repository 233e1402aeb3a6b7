"""The type and range of every command's scalar config values, checked in one step when the command starts
(`check_config`, called by `launch.command_errors`), so that `topk=abc` ends in
"topk: expected an integer >= 1, got 'abc'" before any work, not in a traceback from deep inside a run.

`RULES` is the one table: command -> config key -> `Rule`. Keys absent from a run's config (a group not
chosen) are skipped; what depends on other values (a top-k within a store's class count, the teachers'
class lists) stays with the code that knows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ced_lightning.core.errors import ConfigError
from ced_lightning.core.losses import DistillLoss
from ced_lightning.core.quantize import KINDS
from ced_lightning.core.targets import TargetFill
from ced_lightning.models.int8 import QUANTIZE_CHOICES
from ced_lightning.store.audio_writer import COMPRESSIONS

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What a config value may be: `kind` int, float (ints accepted), bool or str; `low`/`high` bounds
    (inclusive, `low` exclusive where `above` is true); `choices`; `null` allowed or not."""

    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple[Any, ...] | None = None
    null: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            text = f"one of {', '.join(str(c) for c in self.choices)}"
        elif self.kind is bool:
            text = "true or false"
        else:
            text = {int: "an integer", float: "a number", str: "a string"}[self.kind]
            if self.low is not None and self.high is not None and not self.above:
                text += f" in [{_num(self.low)}, {_num(self.high)}]"
            else:
                if self.low is not None:
                    text += f" {'>' if self.above else '>='} {_num(self.low)}"
                if self.high is not None:
                    text += f" <= {_num(self.high)}"
        return text + (" or null" if self.null else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if self.choices is not None:
            return value in self.choices
        if self.kind is bool or isinstance(value, bool):
            return self.kind is bool and isinstance(value, bool)
        if self.kind is int and not isinstance(value, int):
            return False
        if self.kind is float and not isinstance(value, int | float):
            return False
        if self.kind is str:
            return isinstance(value, str)
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Rule(int, low=1)  # batch sizes, epochs, top-k
COUNT_OR_NULL = Rule(int, low=1, null=True)
NON_NEGATIVE_INT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, above=True)
POSITIVE_OR_NULL = Rule(float, low=0, above=True, null=True)
NON_NEGATIVE = Rule(float, low=0)
FLAG = Rule(bool)
QUANTIZATIONS = Rule(str, choices=KINDS)
DEVICE_QUANTIZE = Rule(str, choices=QUANTIZE_CHOICES, null=True)

RULES: dict[str, dict[str, Rule]] = {
    "prepare": {
        "workers": Rule(int, low=0, null=True),
        "strict": FLAG,
        "overwrite": FLAG,
        "chunk_samples": COUNT,
        "shard_chunks": COUNT,
        "compression": Rule(str, choices=COMPRESSIONS),
        "throttle_s": NON_NEGATIVE,
        "demo.seed": NON_NEGATIVE_INT,
        "demo.train": COUNT,
        "demo.unlabeled": NON_NEGATIVE_INT,
        "demo.val": COUNT,
        "demo.test": COUNT,
        "demo.clip_seconds": Rule(float, low=0.25),
    },
    "train": {
        "seed": NON_NEGATIVE_INT,
        "train": FLAG,
        "test": FLAG,
        "data.batch_size": COUNT,
        "data.eval_batch_size": COUNT,
        "data.num_workers": NON_NEGATIVE_INT,
        "data.order_workers": COUNT_OR_NULL,
        "data.shuffle_window": COUNT,
        "data.clip_seconds": POSITIVE,
        "data.schedule.warmup_steps": NON_NEGATIVE_INT,
        "data.schedule.epoch_length": COUNT_OR_NULL,
        "data.schedule.val_every": COUNT,
        "data.label_only_baseline": FLAG,
        "data.demo.seed": NON_NEGATIVE_INT,
        "data.demo.clips.train": COUNT,
        "data.demo.clips.unlabeled": NON_NEGATIVE_INT,
        "data.demo.clips.val": COUNT,
        "data.demo.clips.test": COUNT,
        "optim.optimizer.lr": POSITIVE,
        "optim.optimizer.weight_decay": NON_NEGATIVE,
        "optim.warmup_steps": NON_NEGATIVE_INT,
        "optim.min_lr_ratio": Rule(float, low=0, high=1),
        "optim.ema_decay": Rule(float, low=0, high=1, null=True),
        "distill.loss": Rule(str, choices=get_args(DistillLoss)),
        "distill.temperature": POSITIVE,
        "distill.target_fill": Rule(str, choices=get_args(TargetFill)),
        "distill.consistent": FLAG,
        "distill.label_weight": NON_NEGATIVE,
        "trainer.gradient_clip_val": Rule(float, low=0, null=True),
    },
    "extract": {
        "epochs": COUNT,
        "topk": COUNT_OR_NULL,
        "quantization": QUANTIZATIONS,
        "clip_seconds": POSITIVE,
        "segment_seconds": POSITIVE_OR_NULL,
        "seed": NON_NEGATIVE_INT,
        "block_clips": COUNT,
        "micro_batch_size": COUNT,
        "num_workers": NON_NEGATIVE_INT,
        "limit_blocks": COUNT_OR_NULL,
        "throttle_s": NON_NEGATIVE,
        "verify": NON_NEGATIVE_INT,
        "teacher_check.min_gain": Rule(float),
        "teacher_check.batch_size": COUNT,
        "allow_weak_teachers": FLAG,
    },
    "import_logits": {
        "quantization": QUANTIZATIONS,
        "allow_unmatched_rows": FLAG,
        "allow_clips_without_rows": FLAG,
        "num_classes": COUNT,
        "block_clips": COUNT,
        "limit_blocks": COUNT_OR_NULL,
        "throttle_s": NON_NEGATIVE,
    },
    "evaluate": {
        "batch_size": COUNT,
        "length_tolerance_s": NON_NEGATIVE,
        "progress": FLAG,
        "side_by_side": FLAG,
        "num_threads": COUNT_OR_NULL,
    },
    "predict": {
        "topk": COUNT,
        "batch_size": COUNT,
        "segment_seconds": POSITIVE_OR_NULL,
        "hop_seconds": POSITIVE_OR_NULL,
        "length_tolerance_s": NON_NEGATIVE,
        "progress_min_files": NON_NEGATIVE_INT,
        "quantize": DEVICE_QUANTIZE,
        "events_output": Rule(str, null=True),
        "median_window": COUNT,
        "fill_gap": NON_NEGATIVE_INT,
        "min_frames": COUNT,
    },
    "export": {
        "opset": COUNT,
        "quantize": DEVICE_QUANTIZE,
        "verify": FLAG,
    },
}


def check_config(cfg: DictConfig, rules: Mapping[str, Rule]) -> None:
    """Raise ConfigError naming the first key whose value breaks its rule ("topk: expected an integer >= 1,
    got 'abc'"). A value that is missing (`???`) or cannot be resolved is left to the code that reads it."""
    for key, rule in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException:  # missing (???) or unresolvable: its reader says why, in its words
            continue
        if value is _ABSENT:
            continue
        if not rule.accepts(value):
            raise ConfigError(f"{key}: expected {rule.describe()}, got {value!r}")
