"""The data path: Megatron indexed datasets (.bin/.idx), tokenizers, preparation, the default
corpus, and the deterministic, resumable sequence sampler.

Names are imported on first use, so `k2train data prepare` and `--help` do not pay for torch,
which only the sampler needs.
"""

from importlib import import_module

_EXPORTS = {
    "ByteTokenizer": "tokenizer",
    "DataError": "errors",
    "HFTokenizer": "tokenizer",
    "MixtureSampler": "mixture",
    "TiktokenTokenizer": "tiktoken_bpe",
    "build_samplers": "mixture",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "PrepareSummary": "prepare",
    "SequenceSampler": "sampler",
    "default_corpus_prefix": "default_corpus",
    "load_tokenizer": "tokenizer",
    "prepare_dataset": "prepare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
