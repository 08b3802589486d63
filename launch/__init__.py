"""Process launch: the `k2train` command line (`cli`, one `*_cli` module per command, each holding
its arguments and what it prints), the launch environment read from torchrun's or Slurm's
variables (`env`), a launched job's exit status (`job`), and the Slurm scripts (`slurm/`). This is
the top floor: it imports the library (`k2train`, `parallel`), which never imports it.
"""
