"""Distribution of the K2 model over ranks: the pipeline x expert x data-parallel layout of the K2
report (§2.4), applied to a `k2train` model from outside (the model never imports torch.distributed).

The runtime sits at the top of this package: the layout as a pure function (`layout`), the process
groups of one rank (`state`) and the collectives it calls through (`collectives`, observable), the
expert all-to-all (`experts`), the runner that drives one rank's share of a step (`runner`), the
trainer around it (`trainer`), validation (`evaluate`), stop signals and start-up checks. The
mechanisms it is built from are subpackages, each importing only downward:
`pipeline` (stages, schedules, the stage split, overlapped pairs), `zero1` (sharded MuonClip and its
state offload), `checkpoint` (DCP checkpoints and the Hugging Face import/export), `plan` (memory,
traffic and time of any layout without processes) and `profiling` (measured runs).
docs/ARCHITECTURE.md draws the whole house.
"""
