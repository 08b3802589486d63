"""Checkpoints users can trust: layout-free DCP checkpoints written atomically by one writer
(`checkpointer`, `lock`), read through a JSON index without unpickling (`metadata`), tied to the run
that wrote them (`lineage`), resumed after a stop or a non-finite loss (`resume`); and the Hugging
Face format of the released Kimi-K2 weights, imported per rank straight into a layout and exported
tensor by tensor (`convert`, `hf_import`, `hf_export`, `hf_source`, `hf_fp8`, `hf_config`).
"""
