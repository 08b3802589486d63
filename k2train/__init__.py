"""k2train: the Kimi K2 training system (model, MuonClip, data, training loop)."""

__version__ = "0.1.0"
