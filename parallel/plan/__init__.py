"""The planner: memory, traffic and step time of any layout, computed without processes, both as
built (what this runtime allocates and overlaps) and ideal (K2 §2.4's accounting). `planner` makes a
plan per pipeline rank from the cost model (`cost`), the saved activations (`activations`), the
schedule's in-flight peak and buffers (`memory`) and the activation offload budget (`offload`, one
rule shared with the runner); `report`, `layout_report`, `optimizer` and `params` turn layouts,
owners and plans into text.
"""
