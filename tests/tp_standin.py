"""A strict stand-in for vLLM's tensor-parallel collective, for CPU tests. It STANDS FOR vLLM's TP
group: under the external launcher every rank of a tensor-parallel group runs its own `vllm.LLM`, and
the ranks shard each layer between them, so every engine call (generate, score, a weight update, sleep,
wake up) is a collective that all of them must make, with identical inputs. On a GPU a rank that makes
a call its peers do not make (or makes it with other prompts, n, sampling settings or seed) hangs in
NCCL, or silently gets other outputs. vLLM's CPU build runs no tensor parallelism, so this wraps any
engine of the rollout interface (here `rollout.HFRollout` from the model's folder, one per rank) and, on
every call, all-gathers a digest of (method, arguments) within its TP group and raises when the peers'
digests differ, or when a peer never makes the call (a timeout instead of a hang).

    engine = TPStandin(rollout.HFRollout(path), tp=2)   # every rank, at the same point (it makes groups)
    engine.calls                                         # this rank's calls, in order: ["generate", ...]
"""
from __future__ import annotations

import hashlib
import pickle
from datetime import timedelta

import torch.distributed as dist


class TPStandin:
    def __init__(self, engine, tp: int, timeout_s: float = 60.0):
        self.engine, self.tp = engine, tp
        world = dist.get_world_size()
        # Every rank creates every group, in the same order (torch.distributed.new_group's rule).
        ranks = [list(range(first, first + tp)) for first in range(0, world, tp)]
        self.group, _ = dist.new_subgroups_by_enumeration(ranks, timeout=timedelta(seconds=timeout_s), backend="gloo")
        self.calls: list[str] = []

    def __getattr__(self, name):  # keeps_weights, shares_trainer_model, processor, close ...
        return getattr(self.engine, name)

    def _collective(self, method: str, *args) -> None:
        """All-gather this call's digest within the TP group; raise unless every peer made the same call."""
        digest = hashlib.sha256(pickle.dumps((method, args))).hexdigest()
        self.calls.append(method)
        peers = [None] * self.tp
        try:
            dist.all_gather_object(peers, (method, digest), group=self.group)
        except RuntimeError as e:  # a peer never came: vLLM would hang here
            raise RuntimeError(f"TP stand-in: rank {dist.get_rank()} called {method} (call {len(self.calls)}) and a "
                               f"tensor-parallel peer did not (vLLM's TP collective would hang): {e}") from None  # fmt: skip
        if len(set(peers)) > 1:
            raise RuntimeError(f"TP stand-in: the ranks of one tensor-parallel group made different engine calls "
                               f"(vLLM's TP collective would hang or diverge): {peers}")  # fmt: skip

    def generate(self, prompts, n=1, settings=None):
        self._collective("generate", prompts, n, settings)
        return self.engine.generate(prompts, n=n, settings=settings)

    def generate_stream(self, prompts, n=1, settings=None):
        """VLLMRollout's streamed generation (the trainer's default path), the same collective as `generate`; the
        groups come out last prompt first, as vLLM hands each out when it finishes, in no set order."""
        self._collective("generate", prompts, n, settings)
        done = self.engine.generate(prompts, n=n, settings=settings)
        for i in reversed(range(len(prompts))):
            yield i, done[i * n : (i + 1) * n]

    def score(self, prompt_ids, completion_ids):
        self._collective("score", [list(p) for p in prompt_ids], [list(c) for c in completion_ids])
        return self.engine.score(prompt_ids, completion_ids)

    def update_weights(self, named_tensors):
        named = list(named_tensors)  # the tensors each rank would load: names, shapes, checksums
        self._collective("update_weights", [(n, tuple(t.shape), t.double().sum().item()) for n, t in named])
        return self.engine.update_weights(named)

    def sleep(self):
        self._collective("sleep")
        return self.engine.sleep()

    def wake_up(self):
        self._collective("wake_up")
        return self.engine.wake_up()
