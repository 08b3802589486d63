"""Process launch: the local multi-process launcher, torchrun and Slurm entry points.

Today `k2train train` runs as one process; see the README for what is not implemented yet.
"""
