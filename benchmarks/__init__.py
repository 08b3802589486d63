"""Benchmarks, run by make targets and never by pytest: `cpu_*` on any machine with the project's
venv (`make bench`, `bench-optimizer`, `bench-memory`, ...), `gpu_*` on one GPU with the machine's
own torch (`make bench-device`, `bench-device-memory`). They print numbers for comparisons; the
tests assert behaviour."""
