"""Any timm image backbone as an audio tagger on log-mel input (for teachers of another architecture)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from ced_lightning.models.ced import FrontEndConfig, LogMelFrontEnd

# 128 mel bins need a longer FFT than CED's 512 points, or the lowest filters are empty.
TIMM_FRONT_END = FrontEndConfig(n_mels=128, n_fft=1024, win_length=1024)


class TimmMelClassifier(nn.Module):
    """Log-mel front end -> per-mel-bin BatchNorm -> a timm CNN/ViT with one input channel -> logits.

    `forward(waveform [B, samples] @16 kHz) -> logits [B, classes]`; `forward_spectrogram(mel)` takes the
    front end's output, like CED, so augmentation masks apply the same way to both.
    """

    def __init__(
        self,
        backbone: str = "mobilenetv3_large_100",
        num_classes: int = 527,
        front_end: FrontEndConfig | dict | None = None,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        if isinstance(front_end, dict):
            front_end = FrontEndConfig(**front_end)
        self.front_end = LogMelFrontEnd(front_end or TIMM_FRONT_END)
        self.init_bn = nn.BatchNorm1d(self.front_end.config.n_mels, momentum=0.01)
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=num_classes, in_chans=1, **backbone_kwargs
        )
        self.backbone_name = backbone
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        """The backbone's classifier: what fine-tuning replaces and a linear probe trains alone."""
        return self.backbone.get_classifier()

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_spectrogram(self.front_end(waveform))

    def forward_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.init_bn(mel).unsqueeze(1))

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[batch, samples]` -> the backbone's pooled features before its classifier `[batch, features]`."""
        return self.forward_and_embed(waveform)[1]

    def forward_and_embed(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`forward`, `embed`) of `[batch, samples]` from one pass through the backbone."""
        features = self.backbone.forward_features(self.init_bn(self.front_end(waveform)).unsqueeze(1))
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return self.backbone.get_classifier()(pooled), pooled
