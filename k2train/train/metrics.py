"""The run's metrics: a JSONL file that survives crashes, mirrored to wandb when enabled.

`metrics.jsonl` holds one JSON object per line. The first line is the run header
(`{"kind": "run", ...}`, keys in `HEADER_KEYS`); every later line is one optimizer step
(`{"kind": "step", ...}`, keys in `STEP_KEYS`). Each line is flushed as it is written, so a
run that dies keeps every step it logged.

Non-finite floats: strict JSON has no NaN or infinity, and Python's default `NaN` token is
rejected by most other readers. They are written as the strings "NaN", "Infinity" and
"-Infinity" (the spellings JavaScript and Python's `float()` accept), so each line stays
valid JSON and `read_metrics` turns them back into floats. Step records hold no other
strings apart from `kind`, so the decoding is unambiguous.

Only one process of a run should write the log (the loop picks the rank); records are the
global values of the step (losses averaged, max logits reduced with MAX).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

METRICS_FILE = "metrics.jsonl"

HEADER_KEYS = (
    "world_size", "pp", "vp", "ep", "dp", "config", "params_total", "params_active", "started_at",
)
# Nested lists: max_logit [layer][head]; max_logit_layer, qk_clipped_heads [layer];
# expert_load [moe layer][expert]; expert_load_imbalance, router_bias_abs_mean [moe layer].
STEP_KEYS = (
    "step", "loss", "lr", "tokens_per_s", "tokens", "step_time_s", "grad_norm", "max_logit",
    "max_logit_layer", "qk_clipped_heads", "expert_load", "expert_load_imbalance",
    "router_bias_abs_mean",
)
# Optional step keys: seconds since the run started (the summary's wall time); the validation loss
# (steps that take one, train.eval_every); {dataset name: realised share of the sequences drawn so
# far} (data.mixture runs).
OPTIONAL_STEP_KEYS = ("elapsed_s", "val_loss", "data_share")

_FLOAT_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_FLOAT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_WANDB_SCALARS = ("loss", "lr", "tokens_per_s", "grad_norm")


def moe_layer_ids(record: dict[str, Any]) -> list[int]:
    """Model-layer indices of the MoE layers of a step record.

    K2 §1 (`first_k_dense_replace`): the first layers are dense and every later one is MoE,
    so the M MoE entries are the last M of the L layers.
    """
    num_layers = len(record["max_logit_layer"])
    num_moe = len(record["expert_load_imbalance"])
    return list(range(num_layers - num_moe, num_layers))


def wandb_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a step record that go to wandb; the big nested lists stay in the JSONL."""
    scalars = {key: record[key] for key in _WANDB_SCALARS}
    if "val_loss" in record:
        scalars["val_loss"] = record["val_loss"]
    for name, share in record.get("data_share", {}).items():
        scalars[f"data_share/{name}"] = share
    for layer, value in enumerate(record["max_logit_layer"]):
        scalars[f"max_logit/layer_{layer}"] = value
    for layer, count in enumerate(record["qk_clipped_heads"]):
        scalars[f"qk_clip/layer_{layer}"] = count
    for layer, value in zip(moe_layer_ids(record), record["expert_load_imbalance"]):
        scalars[f"expert_imbalance/layer_{layer}"] = value
    return scalars


class MetricsLog:
    """Writes `run_dir/metrics.jsonl` and, with `use_wandb`, mirrors step scalars to wandb.

    wandb runs offline (files under `run_dir/wandb/`) unless `WANDB_API_KEY` is set; an
    explicit `WANDB_MODE` in the environment wins over both. Use as a context manager or call
    `close()`; a run that exits on an exception is marked failed in wandb.
    """

    def __init__(
        self,
        run_dir: str | Path,
        header: dict[str, Any],
        *,
        use_wandb: bool = False,
        wandb_project: str = "k2train",
        config: dict[str, Any] | None = None,
        run_name: str | None = None,
    ) -> None:
        _check_keys(header, HEADER_KEYS, "run header")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if self.path.exists():
            raise FileExistsError(
                f"metrics file {self.path} already exists; expected a fresh run directory "
                "(set logging.run_name to a new name or remove the old run)"
            )
        self._file = self.path.open("x", encoding="utf-8")
        self._wandb_run = None
        self._write({"kind": "run", **header})
        if use_wandb:
            try:
                self._wandb_run = _start_wandb(
                    self.run_dir, wandb_project, run_name or self.run_dir.name, config or {}
                )
            except BaseException:
                self._file.close()
                self.path.unlink()
                raise

    def log_step(self, record: dict[str, Any]) -> None:
        """Appends one step record (keys `STEP_KEYS`) and mirrors its scalars to wandb."""
        if self._file.closed:
            raise ValueError(f"metrics log {self.path} is closed; log steps before close()")
        _check_keys(record, STEP_KEYS, f"step record {record.get('step')!r}")
        if record.get("kind", "step") != "step":
            raise ValueError(
                f"step record {record['step']} has kind {record['kind']!r}; expected 'step'"
            )
        self._write({"kind": "step", **record})
        if self._wandb_run is not None:
            self._wandb_run.log(wandb_scalars(record), step=record["step"])

    def close(self, failed: bool = False) -> None:
        """Closes the file and finishes wandb (exit code 1 when `failed`). Safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish(exit_code=1 if failed else 0)
            import wandb

            # finish() can return before wandb's service process has written the run's records
            # (seen with wandb 0.31 offline); teardown waits for it, so the files are complete
            # when close() returns, also where wandb's atexit hook does not run.
            wandb.teardown()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_encode(record, "record"), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        # Flushed per line: a crashed run keeps every complete record.
        self._file.flush()


def read_metrics(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Reads a `metrics.jsonl` (or the one in a run directory) into (header, step records).

    Non-finite strings become floats again. A last line without its newline is the torn write
    of a crashed run and is skipped; any other line that is not JSON is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; expected the {METRICS_FILE} of a run")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} line {number} is not valid JSON ({err.msg}); "
                    "expected one object per line"
                ) from err
    if not records or records[0].get("kind") != "run":
        raise ValueError(
            f"{path} does not start with a run header; expected a first line with kind 'run'"
        )
    for number, record in enumerate(records[1:], start=2):
        if record.get("kind") != "step":
            raise ValueError(
                f"{path} line {number} has kind {record.get('kind')!r}; expected 'step'"
            )
    return records[0], [_decode(record) for record in records[1:]]


def _start_wandb(run_dir: Path, project: str, name: str, config: dict[str, Any]) -> Any:
    """Starts a wandb run in `run_dir`.

    Silent (WANDB_SILENT) and without console capture, so the progress bar stays clean.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    default_mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    mode = os.environ.get("WANDB_MODE") or default_mode
    try:
        import wandb

        return wandb.init(
            project=project,
            dir=str(run_dir),
            mode=mode,
            config=config,
            name=name,
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as err:
        raise RuntimeError(
            f"wandb could not start a {mode} run in {run_dir} ({type(err).__name__}: {err}); "
            "set logging.wandb: false in the config to train without it"
        ) from err


def _check_keys(record: dict[str, Any], required: tuple[str, ...], what: str) -> None:
    missing = [key for key in required if key not in record]
    if missing:
        raise KeyError(f"{what} lacks {', '.join(missing)}; expected all of {', '.join(required)}")


def _encode(value: Any, key: str) -> Any:
    """Returns `value` with non-finite floats as strings; rejects what JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else _FLOAT_TO_STR[value]
    if isinstance(value, (list, tuple)):
        return [_encode(item, key) for item in value]
    if isinstance(value, dict):
        return {str(k): _encode(item, str(k)) for k, item in value.items()}
    raise TypeError(
        f"metrics key {key!r} holds a {type(value).__name__}; expected int, float, str or lists "
        "of them (convert tensors with .item() or .tolist())"
    )


def _decode(value: Any) -> Any:
    """Inverse of `_encode` for step records: the non-finite strings become floats."""
    if isinstance(value, str):
        return _STR_TO_FLOAT.get(value, value)
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        return {k: (item if k == "kind" else _decode(item)) for k, item in value.items()}
    return value
