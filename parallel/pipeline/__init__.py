"""Pipeline parallelism (K2 §2.4): the model cut into virtual stages balanced by cost (`split`,
`stage_cost`), the interleaved 1F1B and zero-bubble schedules as a pure table (`schedule_table`) and
as torch pipelining schedules (`stages`), lean receive buffers (`buffers`), the hooks through which
the stages' actions are observed (`hooks`), and the communication overlap that pairs one
micro-batch's forward with another's backward so that each one's expert all-to-all is in flight
while the other computes (`overlap`). Every use of torch's private pipelining code (the schedules'
order, the overlapped pairs, the lean receive stage, the lowering) is in `torch_compat`, behind a
version gate.
"""
