"""``tokentrail verify``: does the policy model, scoring the exported tokens, give the logprobs vLLM
sampled them with?

A trainer computes its new logprobs on ``input_ids`` at the positions ``loss_mask`` marks and divides by
the recorded ones (the importance ratio of PPO and GRPO). If the tokens are shifted, the mask is off by
one, a reply was re-tokenized from its text, or the weights are not the ones that sampled, every check
on the export itself still passes; only the model can tell. So this scores each sequence with a Hugging
Face causal LM (one forward pass per sequence, logits kept only where the mask is 1) and compares each
generated token's logprob with the recorded one.

The comparison itself (``compare``) is pure; only ``Scorer`` needs torch and transformers, imported when
it is built, so ``tokentrail serve`` never needs them (the ``verify`` extra has them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokentrail.proxy.training.sequences import TrainingSequence

DEFAULT_TOLERANCE = 0.05


class VerifyError(ValueError):
    """The input cannot be verified at all (no logprobs, a vocabulary that does not fit, no model)."""


@dataclass
class SequenceCheck:
    """One sequence: generated tokens compared, how far apart, and where it first went wrong."""

    trajectory_id: str | None
    sequence_index: int | None
    compared: int = 0  # masked tokens with a recorded logprob, scored by the model
    missing: int = 0  # masked tokens without a recorded logprob (or at position 0: no context)
    mean_abs_delta: float = 0.0
    max_abs_delta: float = 0.0
    over_tolerance: int = 0
    first_over: int | None = None  # index into input_ids of the first token over the tolerance
    first_missing: int | None = None

    @property
    def ok(self) -> bool:
        return self.over_tolerance == 0 and self.missing == 0


@dataclass
class VerifyReport:
    tolerance: float
    sequences: list[SequenceCheck] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return sum(s.compared for s in self.sequences)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.sequences)

    @property
    def over_tolerance(self) -> int:
        return sum(s.over_tolerance for s in self.sequences)

    @property
    def mean_abs_delta(self) -> float:
        compared = self.compared
        total = sum(s.mean_abs_delta * s.compared for s in self.sequences)
        return total / compared if compared else 0.0

    @property
    def max_abs_delta(self) -> float:
        return max((s.max_abs_delta for s in self.sequences), default=0.0)

    @property
    def first_failure(self) -> SequenceCheck | None:
        return next((s for s in self.sequences if not s.ok), None)

    def passed(self, max_over_fraction: float = 0.0) -> bool:
        """No masked token without a logprob, and at most this share of tokens over the tolerance."""
        if self.missing or not self.compared:
            return False
        return self.over_tolerance <= max_over_fraction * self.compared

    def line(self) -> str:
        first = self.first_failure
        where = ""
        if first is not None:
            position = first.first_over if first.first_over is not None else first.first_missing
            where = f"; first at {first.trajectory_id}#{first.sequence_index} position {position}"
        missing = f", {self.missing} masked tokens without a logprob" if self.missing else ""
        return (
            f"{len(self.sequences)} sequences, {self.compared} tokens compared, "
            f"|Δ logprob| mean {self.mean_abs_delta:.4f} max {self.max_abs_delta:.4f}, "
            f"{self.over_tolerance} over {self.tolerance:g}{missing}{where}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "sequences": len(self.sequences),
            "compared": self.compared,
            "missing": self.missing,
            "mean_abs_delta": self.mean_abs_delta,
            "max_abs_delta": self.max_abs_delta,
            "over_tolerance": self.over_tolerance,
            "per_sequence": [asdict(s) for s in self.sequences],
        }


def scored_positions(loss_mask: list[int]) -> list[int]:
    """The positions a trainer's loss uses: where the mask is 1, except position 0 (no context)."""
    return [p for p, m in enumerate(loss_mask) if m and p > 0]


def compare(
    row: dict[str, Any], model_logprobs: dict[int, float], tolerance: float = DEFAULT_TOLERANCE
) -> SequenceCheck:
    """Compare the model's logprob at each masked position with the recorded one."""
    check = SequenceCheck(row.get("trajectory_id"), row.get("sequence_index"))
    recorded: list[float | None] = row["logprobs"]
    total = 0.0
    for position, masked in enumerate(row["loss_mask"]):
        if not masked:
            continue
        sampled = recorded[position] if position < len(recorded) else None
        model = model_logprobs.get(position)
        if sampled is None or model is None or not math.isfinite(sampled):
            check.missing += 1
            if check.first_missing is None:
                check.first_missing = position
            continue
        delta = abs(model - sampled)
        check.compared += 1
        total += delta
        check.max_abs_delta = max(check.max_abs_delta, delta)
        if delta > tolerance:
            check.over_tolerance += 1
            if check.first_over is None:
                check.first_over = position
    check.mean_abs_delta = total / check.compared if check.compared else 0.0
    return check


class Scorer:
    """A Hugging Face causal LM that gives the logprob of each token at the positions asked for."""

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str = "float32") -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise VerifyError(
                f"verify needs torch and transformers ({exc.name} is missing): "
                "pip install 'tokentrail[verify]'"
            ) from exc
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        try:  # Any: transformers' own annotations of .to() do not type-check
            model: Any = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise VerifyError(f"cannot load the model at {model_path}: {exc}") from exc
        self.model = model.to(device).eval()
        embeddings = self.model.get_output_embeddings()
        self.vocab_size = int(
            embeddings.weight.shape[0] if embeddings is not None else self.model.config.vocab_size
        )

    def logprobs(self, input_ids: list[int], positions: list[int]) -> dict[int, float]:
        """log p(input_ids[p] | input_ids[:p]) for each p in ``positions`` (each >= 1)."""
        if not positions:
            return {}
        outside = next((i for i in input_ids if not 0 <= i < self.vocab_size), None)
        if outside is not None:
            raise VerifyError(
                f"token ID {outside} is outside the model's vocabulary of {self.vocab_size}: "
                "is this the model the export was sampled from?"
            )
        torch = self._torch
        ids = torch.tensor([input_ids], device=self.device)
        before = torch.tensor([p - 1 for p in positions], device=self.device)
        with torch.inference_mode():
            try:  # only the rows the mask needs (a long sequence's full logits can be gigabytes)
                logits = self.model(input_ids=ids, logits_to_keep=before).logits[0].float()
            except TypeError:  # a model class without logits_to_keep
                logits = self.model(input_ids=ids).logits[0, before].float()
            if logits.shape[0] != len(positions):  # a forward that took logits_to_keep into **kwargs:
                logits = logits[before]  # it gave every row; no second forward pass needed
            chosen = torch.tensor([input_ids[p] for p in positions], device=self.device)
            values = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None])[:, 0]
        return dict(zip(positions, values.tolist(), strict=True))


def verify(
    scorer: Scorer,
    rows: Iterable[dict[str, Any]],
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Callable[[int], object] | None = None,
) -> VerifyReport:
    """Score every sequence and compare; raises ``VerifyError`` when nothing had a logprob."""
    sink = ScoringSink(scorer, tolerance)
    for row in rows:
        sink.score(row)
        if progress is not None:
            progress(1)
    return sink.finish()


class ScoringSink:
    """Scores sequences as they come: from a file, or as ``export`` builds them from the database
    (a sink like export's JSONL and Parquet ones, so memory stays bounded by its batch)."""

    def __init__(self, scorer: Scorer, tolerance: float = DEFAULT_TOLERANCE) -> None:
        self.scorer = scorer
        self.report = VerifyReport(tolerance)

    def score(self, row: dict[str, Any]) -> SequenceCheck:
        positions = [p for p in scored_positions(row["loss_mask"]) if _has(row["logprobs"], p)]
        check = compare(row, self.scorer.logprobs(row["input_ids"], positions), self.report.tolerance)
        self.report.sequences.append(check)
        return check

    def write(self, sequences: list[TrainingSequence]) -> None:
        for sequence in sequences:
            self.score(sequence.as_dict())

    def close(self) -> None:
        """Nothing to release (export's sink protocol)."""

    def finish(self) -> VerifyReport:
        report = self.report
        if not report.sequences:
            raise VerifyError("no sequences to verify")
        if not report.compared and report.missing:
            raise VerifyError(
                "the export has no logprobs for its generated tokens: record calls with logprobs "
                '(e.g. "logprobs": true, or VLLMModel(..., params={"logprobs": True}))'
            )
        return report


def _has(logprobs: list[float | None], position: int) -> bool:
    return position < len(logprobs) and logprobs[position] is not None


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """The sequences of a ``tokentrail export`` file, JSONL or Parquet (by its first bytes)."""
    with path.open("rb") as file:
        parquet = file.read(4) == b"PAR1"
    if parquet:
        import pyarrow.parquet as pq

        parquet_file = pq.ParquetFile(str(path))
        for batch in parquet_file.iter_batches(batch_size=64):
            yield from _checked(batch.to_pylist(), path)
        return
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise VerifyError(f"{path}:{number}: not a JSON line ({exc})") from exc
                yield from _checked([row], path)


def count_export(path: Path) -> int | None:
    """How many sequences a file holds (for the progress bar), when cheap to know."""
    with path.open("rb") as file:
        if file.read(4) == b"PAR1":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(str(path)).metadata.num_rows)
        file.seek(0)
        return sum(1 for line in file if line.strip())


_NEEDED = ("input_ids", "loss_mask", "logprobs")


def _checked(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    for row in rows:
        absent = [name for name in _NEEDED if not isinstance(row.get(name), list)]
        if absent:
            raise VerifyError(f"{path}: a row has no {', '.join(absent)}: is it a tokentrail export?")
    return rows
