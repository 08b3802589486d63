"""The K2 model family (MLA + MoE), free of torch.distributed."""

from k2train.model.transformer import K2Model, ModelOutput, ModelPart, count_parameters

__all__ = ["K2Model", "ModelOutput", "ModelPart", "count_parameters"]
