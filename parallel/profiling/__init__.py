"""Measured runs (`k2train profile`): a few training steps of any layout with named timing hooks on
compute, the collectives and the pipeline actions (`instrument`, `timing`), saved-activation and
held-memory counts (`memory`), a report with tokens/s, MFU and time per rank (`report`) and the
executed pipeline timeline (`timeline`), driven by `run`.
"""
