"""Process launch: the `k2train` command line (`cli`), which runs as one process or as each rank of
a torchrun (or Slurm one-task-per-GPU) launch.
"""
