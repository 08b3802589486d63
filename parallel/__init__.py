"""Distribution of the K2 model over ranks (DESIGN §1-2): the layout as a pure function
(`layout`), process groups (`state`), the expert all-to-all (`expert_parallel`), pipeline stages
and the interleaved schedules (`pipeline`, `schedule_table`), ZeRO-1 MuonClip with whole-matrix
ownership (`ownership`, `zero1`), and the runner that drives one rank's share of a step (`runner`,
`trainer`).

Parallelism is applied to a `k2train` model from here; the model itself never imports
torch.distributed.
"""
