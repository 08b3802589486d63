"""ZeRO-1 MuonClip (K2 §2.1, §2.4): every optimizer item owned whole by one rank of its
gradient-reduction group, balanced by Newton-Schulz FLOPs (`ownership`); one reduce-scatter delivers
each gradient to its owner, the owner runs Muon or AdamW and QK-Clip on its float32 master copy, one
all-gather returns the parameters (`optimizer`); the owners' states may live on the host, streamed
in chunks (`offload`).
"""
