"""Busiest pipeline rank's compute: stages split by layer count against stages split by cost.

On a tiny model whose head is a large share of the cost (an 8,192-token vocabulary over a hidden
size of 64), each virtual stage's forward and backward of one micro-batch (the last stage with its
head and float32 loss) is timed on this CPU, the two splits alternating rep by rep so that they
share the machine's noise; a rank's time is the sum of its stages' medians. The plan's predicted
busiest/mean ratio is printed beside the measured one. Not a test: `make bench-split` prints numbers.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from k2train.config.load import load_config
from k2train.model import K2Model, ModelPart
from parallel.pipeline.stages import lm_loss
from parallel.pipeline.split import choose_split, rank_costs, split_layers, unit_costs

ROOT = Path(__file__).parents[1]
OVERRIDES = ["model.vocab_size=8192", "model.num_layers=8", "model.num_experts=8", "data.seq_len=128",
             "train.micro_batch_size=2", "train.global_batch_tokens=2048", "parallel.pp=4", "parallel.vp=1",
             "parallel.ep=1", "parallel.dp=1"]
REPS = 7


def stage_seconds(model: K2Model, first: bool, last: bool, cfg, x_BS, y_BS) -> float:
    start = time.perf_counter()
    x = x_BS if first else torch.randn(*x_BS.shape, cfg.model.hidden_size, requires_grad=True)
    out = model(x).output
    (lm_loss(out, y_BS) if last else out.float().square().mean()).backward()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "k2_tiny.yaml", OVERRIDES)
    pp, stages = cfg.parallel.pp, cfg.parallel.pp * cfg.parallel.vp
    splits = {"by count": split_layers(cfg.model.num_layers, stages), "by cost": choose_split(cfg, stages, pp)}
    models = {name: [K2Model(cfg.model, ModelPart(r, embedding=s == 0, head=s == stages - 1), seed=0)
                     for s, r in enumerate(split)] for name, split in splits.items()}
    torch.manual_seed(0)
    x_BS = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
    y_BS = torch.randint(0, cfg.model.vocab_size, x_BS.shape)
    times = {name: [[] for _ in range(stages)] for name in splits}
    for rep in range(REPS + 1):  # the first rep warms up
        for name in splits:
            for s, model in enumerate(models[name]):
                t = stage_seconds(model, s == 0, s == stages - 1, cfg, x_BS, y_BS)
                if rep:
                    times[name][s].append(t)
    layer_costs, head_cost = unit_costs(cfg.model, cfg.data.seq_len, cfg.memory.selective_recompute, fused=False)
    print(f"k2_tiny with {', '.join(OVERRIDES[:2])}: {stages} stages over pp {pp}, median of {REPS} reps per stage")
    print(f"{'split':10} {'layers per stage':18} {'busiest rank (ms)':>18} {'mean (ms)':>10} "
          f"{'busiest/mean':>13} {'plan busiest/mean':>18}")
    busiest = {}
    for name, split in splits.items():
        ranks = [0.0] * pp
        for s in range(stages):
            ranks[s % pp] += statistics.median(times[name][s]) * 1e3
        counts = [len(r) for r in split]
        plan = rank_costs(counts, pp, layer_costs, head_cost)
        busiest[name] = max(ranks)
        print(f"{name:10} {' '.join(map(str, counts)):18} {max(ranks):18.2f} {sum(ranks) / pp:10.2f} "
              f"{max(ranks) / (sum(ranks) / pp):13.3f} {max(plan) / (sum(plan) / pp):18.3f}")
    print(f"busiest rank's compute, by cost / by count: {busiest['by cost'] / busiest['by count']:.3f}")


if __name__ == "__main__":
    main()
