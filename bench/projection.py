"""Tokens per target pass for projections: measured on our SmolLM2 pair, or published.

Random weights (bench/e2e_synthetic.py) measure what a pass COSTS; how many tokens a pass
yields needs real models. A tokens/s figure for a 70B-shaped offloaded pass is therefore a
projection: measured seconds per iteration times a tokens-per-pass figure taken from
elsewhere. This module says where that figure comes from, every time:

- ``measured_tokens_per_pass(budget, sampled)``: our own, read from a committed acceptance
  result of ``bench/acceptance.py`` (``bench/results/acceptance-*.json``) on the SmolLM2-135M
  pair with its default draft. That draft agrees with its target on ~97% of greedy tokens
  (``AGREEMENT_FILE``), far above what a 7B draft achieves against a 70B target, so these are
  optimistic for a 70B/7B pair.
- ``PAPER_ROWS``: the SpecExec paper's published tokens per pass for Llama-2-70B with a
  Llama-2-7B draft, offloaded.

Only the standard library: gpu_quick.py's parent process imports this without torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"
AGREEMENT_FILE = RESULTS / "2026-12-01-cpu-int4-filegroup.md"
DEFAULT_POLICY = "calibrated"       # SpecExec's default tree policy (tree_policy.set_defaults)


@dataclass(frozen=True)
class PaperRow:
    """One published row: ``tokens_per_pass`` for ``pair`` (``target`` precision)."""

    pair: str
    target: str
    tokens_per_pass: float
    published_tok_s: float
    published_speedup: float


# SpecExec (Svirschevski et al., "SpecExec: Massively Parallel Speculative Decoding for
# Interactive LLM Inference on Consumer Devices", arXiv 2406.02532), the table of offloaded
# inference on an A100, Llama-2-7B-chat draft with a Llama-2-70B-chat target. The two rows'
# tokens per pass, tok/s and speedup were read through a summary of that table, not from the
# table itself; each matches the abstract (speedups up to 18.7x with 16-bit weights, 4-6 tok/s
# with 4-bit). The budget and temperature of each row were not confirmed: the paper's offloaded
# runs use budgets up to 1024-2048 tokens and report "up to 20 tokens per target model
# iteration". Check against the paper before quoting these in a publication.
PAPER_SOURCE = ("SpecExec paper (arXiv 2406.02532), offloaded A100 table, Llama-2-7B-chat draft / "
                "Llama-2-70B-chat target; row budgets and temperatures not confirmed here")
PAPER_ROWS = (
    PaperRow("Llama-2-7B / Llama-2-70B", "16-bit", 20.6, 3.1, 18.7),
    PaperRow("Llama-2-7B / Llama-2-70B", "GPTQ 4-bit", 12.1, 6.0, 8.9),
)


@dataclass(frozen=True)
class Measured:
    """Tokens per pass measured at ``budget_measured`` for a requested ``budget``."""

    tokens_per_pass: float
    budget: int
    budget_measured: int
    policy: str
    file: str
    commit: str
    temperature: float

    @property
    def label(self) -> str:
        if self.budget == self.budget_measured:
            at = f"budget {self.budget}"
        elif self.budget_measured < self.budget:
            at = f"budget {self.budget_measured} (the largest measured below {self.budget}: a lower bound)"
        else:
            at = f"budget {self.budget_measured} (none measured at or below {self.budget}: an upper bound)"
        return (f"SmolLM2-135M pair, default draft, {self.policy} tree, "
                f"{'greedy' if self.temperature == 0 else f'T={self.temperature:g}'}, {at}: "
                f"{self.tokens_per_pass:.2f} tokens/pass from {self.file} (commit {self.commit})")


def _rows(path: Path) -> tuple[dict, list]:
    data = json.loads(path.read_text())
    return data.get("meta", {}), data.get("rows", [])


def _usable(row: dict, sampled: bool) -> bool:
    t = float(row.get("temperature") or 0.0)
    return (t > 0) == sampled and row.get("draft", "default") == "default" and row.get("tokens_per_pass")


def acceptance_file(sampled: bool, results: Path = RESULTS) -> Optional[Path]:
    """The acceptance result to read: among ``results/acceptance*.json`` with rows of the
    default draft in this mode (greedy or sampled) and the default tree policy, the newest by
    its recorded date; at equal dates, results on held-out prompts (never used for tuning)
    first, then the file name. None if there is none."""
    cands = []
    for path in sorted(results.glob("acceptance*.json")):
        try:
            meta, rows = _rows(path)
        except (OSError, ValueError):
            continue
        if any(_usable(r, sampled) and r.get("method") == DEFAULT_POLICY for r in rows):
            cands.append((str(meta.get("date", "")), "heldout" in path.name, path.name, path))
    return max(cands)[3] if cands else None


def measured_tokens_per_pass(budget: int, sampled: bool = False, path: Optional[Path] = None,
                             results: Path = RESULTS) -> Optional[Measured]:
    """Our tokens per pass at ``budget`` (the default policy's row), or at the largest
    measured budget below it (tokens per pass grows with the budget, so that is a lower
    bound), or failing that the smallest measured (an upper bound); ``label`` says which.
    None if no acceptance result covers this mode."""
    path = path or acceptance_file(sampled, results)
    if path is None:
        return None
    meta, rows = _rows(Path(path))
    rows = [r for r in rows if _usable(r, sampled) and r.get("method") == DEFAULT_POLICY]
    below = [r for r in rows if int(r["budget"]) <= budget] or sorted(rows, key=lambda r: int(r["budget"]))[:1]
    if not below:
        return None
    row = max(below, key=lambda r: int(r["budget"]))
    rel = Path(path).resolve()
    try:
        rel = rel.relative_to(RESULTS.parent.parent)
    except ValueError:
        pass
    return Measured(float(row["tokens_per_pass"]), int(budget), int(row["budget"]), DEFAULT_POLICY, str(rel),
                    str(meta.get("commit", "?")), float(row.get("temperature") or 0.0))


def draft_agreement(path: Path = AGREEMENT_FILE) -> Optional[float]:
    """The default draft's teacher-forced top-1 agreement with the SmolLM2 target, read from
    the table row marked ``(the default)`` in ``AGREEMENT_FILE``; None if not found."""
    try:
        for line in path.read_text().splitlines():
            if "(the default)" in line:
                nums = re.findall(r"\|\s*([01]\.\d+)\s*(?=\|)", line)
                return float(nums[0]) if nums else None
    except OSError:
        return None
    return None


def agreement_note() -> str:
    a = draft_agreement()
    share = f"{a:.1%}" if a is not None else "about 97%"
    return (f"the SmolLM2 pair's default draft agrees with its target on {share} of greedy tokens "
            f"({AGREEMENT_FILE.name}), far above a 7B draft's agreement with a 70B target: projections from "
            "its tokens per pass are optimistic for a 70B/7B pair")
