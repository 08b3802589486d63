"""MuonClip (Muon + AdamW + QK-Clip) and the WSD learning-rate schedule (K2 §2.1, §2.5)."""

from k2train.optim.muon_clip import MuonClip, split_param_groups
from k2train.optim.newton_schulz import newton_schulz, newton_schulz_many
from k2train.optim.qk_clip import apply_qk_clip_, clip_attention_modules_, qk_clip_scales
from k2train.optim.schedule import lr_at, wsd_lr

__all__ = [
    "MuonClip",
    "apply_qk_clip_",
    "clip_attention_modules_",
    "lr_at",
    "newton_schulz",
    "newton_schulz_many",
    "qk_clip_scales",
    "split_param_groups",
    "wsd_lr",
]
