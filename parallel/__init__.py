"""Distribution of the K2 model over ranks: layout and groups, expert dispatch, pipeline stages and
schedules, the ZeRO-1 reduction and the sharded MuonClip driver (DESIGN §1-3).

Parallelism is applied to a `k2train` model from here; the model itself never imports
torch.distributed. Nothing is distributed yet: the trainer runs one process.
"""
