"""The job configuration: one frozen dataclass per concern, composed by `JobConfig`.

Every field has a type the loader checks and a default that matches the tiny CPU run unless
noted. Values are never rewritten after loading; derived values are properties. Cross-field
rules live in `k2train.config.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (K2: factor 32 from 4096 to 131072, applied after pre-training)."""

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The K2 architecture family (K2 §2.3); names follow the DeepseekV3 config."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 3
    # The first layers use a dense SwiGLU FFN instead of MoE (`first_k_dense_replace`).
    first_dense_layers: int = 1
    dense_intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.827
    num_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    max_position_embeddings: int = 4096
    # None: plain RoPE (pre-training); a YarnConfig: YaRN-extended positions.
    yarn: YarnConfig | None = None
    init_std: float = 0.02
    # Aux-loss-free balancing: bias += rate * sign(mean load - load), per optimizer step.
    router_bias_update_rate: float = 1e-3
    # "grouped_mm" (torch._grouped_mm) or "loop" (the per-expert reference).
    expert_impl: str = "grouped_mm"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers


@dataclass(frozen=True)
class ParallelConfig:
    """The layout (docs/ARCHITECTURE.md#layout). world = pp * ep * dp; dp None means "what the world size leaves"."""

    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B).
    vp: int = 1
    ep: int = 1
    dp: int | None = 1
    # Axes from fastest-varying to slowest, e.g. "ep,pp,dp" keeps EP groups inside a node.
    rank_order: str = "ep,pp,dp"
    gpus_per_node: int = 8
    # "interleaved_1f1b" or "interleaved_zero_bubble".
    schedule: str = "interleaved_1f1b"
    # "none", or "ep": the forward of one micro-batch runs beside the backward of another so each
    # one's expert all-to-all is in flight while the other computes (K2 §2.4; parallel/pipeline/overlap.py).
    overlap: str = "none"
    # With overlap "ep": a paired backward computes the routed experts' weight gradients after issuing
    # its dispatch's exchange, under it (k2train/memory/weight_grads.py); false computes them in place.
    delay_wgrad: bool = True
    # Layers of each of the pp * vp virtual stages, in stage order; None splits them evenly.
    stage_layers: tuple[int, ...] | None = None
    # "cpu", "cuda" or "auto" (cuda when available).
    device: str = "cpu"


@dataclass(frozen=True)
class OptimizerConfig:
    """MuonClip (K2 §2.1) with AdamW for non-matrix parameters, and the WSD schedule (§2.5)."""

    lr: float = 2e-4
    min_lr: float = 2e-5
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    # Newton-Schulz runs in bf16 (K2 §2.1); "float32" is for exactness checks across layouts.
    ns_dtype: str = "bfloat16"
    # Update-RMS matching: O * update_rms * sqrt(max(n, m)).
    update_rms: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    qk_clip: bool = True
    qk_clip_tau: float = 100.0
    # Global gradient-norm clipping; 0 turns it off.
    max_grad_norm: float = 1.0
    # ZeRO-1 cuts AdamW parameters above this many elements into row blocks owned separately (AdamW is
    # elementwise; Muon matrices stay whole), so K2's 1.17B-element embedding and head do not set
    # every owner's padded gradient region. 2**24 = 16.8M is a small part of an owner's share in
    # k2_1t (about 100M elements of a stage's dense items over 16 ranks), so owners end within one
    # block of even. Checkpoint keys follow the blocks: keep it across a run.
    adamw_block_elements: int = 1 << 24
    # WSD: linear warm-up, constant, then cosine from lr to min_lr.
    warmup_steps: int = 500
    stable_steps: int = 149_012
    decay_steps: int = 81_956


@dataclass(frozen=True)
class MemoryConfig:
    """Activation and optimizer-state memory features (K2 §2.4, §2.4.3)."""

    fp8_activations: bool = False
    selective_recompute: bool = False
    activation_offload: bool = False
    # With activation_offload: the GiB of floating-point saved activations a pipeline rank keeps on
    # the device; only the micro-batches whose backward comes last go to host (parallel/plan/offload.py).
    # A number is the same budget on every pipeline rank; "auto" gives each pipeline rank the most
    # its device memory leaves beside its planned peak (parallel/plan/planner.py); null: every micro-batch
    # goes to host. Without activation_offload it has no effect.
    activation_offload_budget_gib: float | str | None = None
    # The owners' master weights and optimizer states live in host memory and reach the device a
    # chunk at a time for the update (K2 §2.4: with few nodes, optimizer states go to CPU).
    optimizer_offload: bool = False
    # The owner updates its items in chunks of at most this many MiB of float32 state, with offload
    # on or off (the same chunks give the same bits); with offload, three chunks' buffers are on the device.
    optimizer_chunk_mb: float = 256.0

    @property
    def optimizer_chunk_bytes(self) -> int:
        return max(1, int(self.optimizer_chunk_mb * (1 << 20)))


@dataclass(frozen=True)
class MixtureEntry:
    """One dataset of a weighted mixture (`data.mixture`)."""

    prefix: str = ""
    # Relative share of the sequences drawn (the weights need not add up to 1).
    weight: float = 1.0
    # Shown in the metrics' realised shares; "" names it by the prefix's last path component.
    name: str = ""
    # A separate held-out .bin/.idx for validation; "" holds out data.valid_fraction of this one.
    valid_prefix: str = ""


@dataclass(frozen=True)
class DataConfig:
    """Pre-tokenised Megatron indexed data (.bin + .idx), or the embedded default corpus."""

    # Path prefix of a .bin/.idx pair; "" with no mixture uses the embedded default corpus.
    prefix: str = ""
    # A weighted mixture of datasets instead of one prefix (k2train/data/mixture.py).
    mixture: tuple[MixtureEntry, ...] = ()
    seq_len: int = 64
    seed: int = 1234
    # Used only to prepare the default corpus: "byte", a HF tokenizer.json, or a tiktoken BPE file.
    tokenizer: str = "byte"
    # Validation data of the single dataset: a separate .bin/.idx prefix ("" for none) ...
    valid_prefix: str = ""
    # ... or the fraction of each dataset's documents (its last ones) held out of training.
    valid_fraction: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes, length of the run and numerics."""

    steps: int = 60
    # Tokens per optimizer step over all ep x dp sequence ranks (K2: 16384 x 4096).
    global_batch_tokens: int = 2048
    # Sequences per micro-batch on one rank.
    micro_batch_size: int = 4
    seed: int = 0
    # "float32" or "bfloat16" model parameters; master weights and gradients stay float32.
    param_dtype: str = "float32"
    # A NaN/inf loss or gradient norm: "stop" (after checkpointing the last good state, when
    # checkpoints are on) or "skip" (drop the step's update and go on).
    on_nonfinite: str = "stop"
    # With on_nonfinite "skip": stop after this many non-finite steps in a row.
    max_skipped_steps: int = 10
    # Log a loss spike when a step's loss exceeds this factor times the mean of the previous 10; 0: off.
    loss_spike_factor: float = 1.5
    # A validation loss every this many steps and after the last; 0: never.
    eval_every: int = 0
    # Batches of global_batch_tokens held-out tokens per validation: the same ones every time.
    eval_batches: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Sharded checkpoints (written by the checkpoint subsystem; 0 = never save)."""

    # Where checkpoints go and a restarted job resumes from; "" is <logging.run_root>/<name>/checkpoints.
    dir: str = ""
    every_steps: int = 0
    keep_last: int = 3
    async_save: bool = False
    # Resume under another optimizer/data/train config than the checkpoint's: "same" refuses, naming
    # what changed; "changed" continues the run's lineage under the new values.
    resume: str = "same"
    # Take the directory's lock from another run that k2train cannot prove gone (another host).
    take_over: bool = False
    # When the newest checkpoint is unreadable, resume from the newest intact one (else stop and name it).
    fallback: bool = False
    # On SIGTERM / SIGINT, write a checkpoint before exiting (when checkpoints are on).
    save_on_signal: bool = True
    # Read a checkpoint that has no JSON index through DCP's pickled `.metadata` (it can run code;
    # set by `--trust-checkpoint`).
    trust_pickle_metadata: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    """Where a run writes and what it shows."""

    run_root: str = "runs"
    # "" names the run by config name and start time.
    run_name: str = ""
    log_every: int = 1
    progress_bar: bool = True
    wandb: bool = True
    wandb_project: str = "k2train"
    plots: bool = True


@dataclass(frozen=True)
class JobConfig:
    """A whole run. `name` is the config's file stem unless set."""

    name: str = "k2_tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
