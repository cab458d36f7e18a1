"""The order in which GRPO (and the supervised warm start) draw training prompts: `PromptSampler`.

    sampler = PromptSampler(len(samples), cfg.seed, rank, world, answer_labels(cfg, samples))
    indices = sampler.next(k)          # the next k sample indices of this process
    sampler.mark_bad(i)                # a sample found bad mid-run: never drawn again
    state = sampler.state_dict()       # plain ints and lists: part of each checkpoint (checkpoints.py)

Epochs are shuffled with a seed per epoch, each process takes every world-th index, and with
`--balance_labels` each epoch goes round-robin over the answers so a majority label is not what the
policy sees most. Its position and bad samples are restored on resume, so a resumed run replays no
prompt and skips none (EasyR1 issue 57). Moved out of train_grpo.py, which re-exports both names.
"""
from __future__ import annotations

import random


def answer_labels(cfg, samples) -> list[str] | None:
    """What `--balance_labels` balances over: each sample's answer (None when it is off)."""
    return [s.answer.strip().lower() for s in samples] if cfg.balance_labels else None


class PromptSampler:
    """Epoch-wise shuffled sample order for this process; its position is part of checkpoints.

    With `labels`, each epoch goes round-robin over the labels (smaller ones recycled), so a
    majority answer (PubMedQA: 55% "yes") is not what the policy sees most. A sample found bad mid-run
    (`mark_bad`: its image cannot be decoded) is never drawn again, also after a resume (the bad
    indices are part of `state_dict`); with several processes, checkpoints merge every process's into each."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, labels: list[str] | None = None):
        self.n, self.seed, self.rank, self.world, self.labels = n, seed, rank, world, labels
        self.epoch, self.pos = 0, 0
        self.bad: set[int] = set()  # samples found bad mid-run (`mark_bad`): never drawn again
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        if not self.labels:
            order = list(range(self.n))
            rng.shuffle(order)
        else:
            by_label: dict[str, list[int]] = {}
            for i, lab in enumerate(self.labels):
                by_label.setdefault(lab, []).append(i)
            lists = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
            order = []
            for k in range(max(len(v) for v in lists)):
                round_ = [v[k % len(v)] for v in lists]
                rng.shuffle(round_)  # else open-ended answers (one per label) come in sorted order every epoch
                order += round_
        return order[self.rank :: self.world]

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if len(self.bad) >= self.n:
                raise SystemExit(f"every sample of the {self.n} is bad (each logged above): no prompt left to train on")
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            i = self._order[self.pos]
            self.pos += 1
            if i not in self.bad:
                out.append(i)
        return out

    def mark_bad(self, i: int) -> None:
        self.bad.add(i)

    def state_dict(self) -> dict:  # plain ints and lists: loadable with torch.load(weights_only=True)
        return {"epoch": self.epoch, "pos": self.pos, "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.bad = set(state.get("bad", []))  # checkpoints written before bad samples were kept have none
        self._order = self._make_order()
