"""Weight sync into the colocated vLLM engine: ours against a bare reload, and everything against only what changed.

    python bench/bench_sync.py                     # SmolLM2-135M-Instruct and the tiny Qwen2.5-VL
    python bench/bench_sync.py --repeats 9

Rows, each the median of `--repeats` alternating timed runs after one untimed warm-up of each:
- smollm2 ours: `VLLMRollout.update_weights(full_parameters(model, float32))`, every tensor, in place;
- smollm2 bare: the same engine, `llm.collective_rpc("reload_weights", kwargs={"weights_iterator":
  iter(pairs), "is_checkpoint_format": True})`, the (name, tensor) list built before the clock: vLLM's cost;
- tiny_qwen2_5_vl ours full / bare / ours changed: the vision tower frozen as --freeze_vision does
  (requires_grad off on `visual.`); changed is `full_parameters(..., changed_only=True)`, the per-step sync.
Ours is split by timing its parts (the reload, consuming our iterator inside it, the CPU re-pack of a tied
lm_head, the cache resets, waking); prints ours/bare (target: SmolLM2 at most 0.5 s or bare + a small
margin) and changed/full, the shapes and the machine; writes JSON under bench/results/.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import Timers, describe, machine  # noqa: E402


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2", "tiny_qwen2_5_vl"])  # kit names
    repeats: int = 5  # alternating timed runs of each row; the median counts
    out_dir: str = str(REPO / "bench" / "results")  # where the JSON goes


def load(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from tests import kit

    if name == "smollm2":
        path = kit.smollm2_dir()
        return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    path = kit.tiny_vlm_dir(name.removeprefix("tiny_"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    for n, p in model.named_parameters():  # as train_grpo's --freeze_vision
        p.requires_grad_("visual." not in n)
    return path, model


def bench_model(name: str, repeats: int) -> dict:
    import torch

    from rollout import VLLMRollout, full_parameters

    path, model = load(name)
    engine = VLLMRollout(path, max_model_len=512, enforce_eager=True)
    timers = Timers()
    timers.wrap(engine.llm, "collective_rpc", key=lambda method, *a, **k: method if isinstance(method, str) else method.__name__)
    timers.wrap(engine.llm, "reset_prefix_cache")
    timers.wrap(engine.llm.llm_engine, "reset_encoder_cache")
    timers.wrap(engine, "_wake", key="wake")

    def ours(changed_only: bool):
        def timed_iter():  # our side of the reload: the iterator's own time, inside vLLM's loop
            it = full_parameters(model, torch.float32, changed_only=changed_only)
            while True:
                t0 = time.perf_counter()
                pair = next(it, None)
                timers.add("our_iterator", t0)
                if pair is None:
                    return
                yield pair

        return engine.update_weights(timed_iter())

    pairs = [(n, p.detach()) for n, p in model.named_parameters()]

    def bare():
        t0 = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs), "is_checkpoint_format": True})
        return time.perf_counter() - t0

    rows = {"ours_full": lambda: ours(False), "bare": bare}
    if name != "smollm2":  # everything trains in SmolLM2: changed_only sends it all
        rows["ours_changed"] = lambda: ours(True)
    times = {k: [] for k in rows}
    parts = {k: [] for k in rows if k != "bare"}
    try:
        for fn in rows.values():  # warm-up, untimed
            fn()
        for _ in range(repeats):
            for key, fn in rows.items():
                timers.reset()
                times[key].append(fn())
                if key in parts:  # "other": ours outside the timed parts (the iterator runs inside the reload)
                    outside = sum(v for p, v in timers.seconds.items() if p != "our_iterator")
                    parts[key].append({**timers.seconds, "other": times[key][-1] - outside})
    finally:
        engine.close()

    def sent(changed_only):
        tensors = list(full_parameters(model, torch.float32, changed_only=changed_only))
        return {"tensors": len(tensors), "mb": sum(t.numel() * t.element_size() for _, t in tensors) / 2**20}

    median = {k: statistics.median(v) for k, v in times.items()}
    split = {k: {p: statistics.median(d.get(p, 0.0) for d in v) for p in v[0]} for k, v in parts.items()}
    shape = {"full": sent(False), **({"changed": sent(True)} if "ours_changed" in rows else {}),
             "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
    # ours and bare ran back to back: their run-by-run difference is steadier than the medians when the load drifts
    paired = statistics.median(a - b for a, b in zip(times["ours_full"], times["bare"]))
    return {"model": name, "shape": shape, "median_seconds": median, "all_seconds": times, "ours_split_median": split,
            "paired_difference_median": paired}


def main(cfg: BenchConfig) -> dict:
    from tests.kit import vllm_cpu_env

    vllm_cpu_env()
    results = [bench_model(name, cfg.repeats) for name in cfg.models]
    m = machine()
    print()
    for r in results:
        med, shape = r["median_seconds"], r["shape"]
        print(f"{r['model']}: {shape['parameters_m']:.1f} M parameters; full sync {shape['full']['tensors']} tensors, "
              f"{shape['full']['mb']:.1f} MiB" + (f"; changed-only sync {shape['changed']['tensors']} tensors, "
              f"{shape['changed']['mb']:.1f} MiB (vision tower frozen)" if "changed" in shape else ""))  # fmt: skip
        print(f"  {'row':<14}{'median s':>10}   all")
        for k, v in med.items():
            print(f"  {k:<14}{v:>10.3f}   {[round(x, 3) for x in r['all_seconds'][k]]}")
        print(f"  ours_full/bare {med['ours_full'] / med['bare']:.2f}, ours_full - bare {med['ours_full'] - med['bare']:+.3f} s "
              f"(median of the paired differences, run by run: {r['paired_difference_median']:+.3f} s)"
              + (f"; ours_changed/ours_full {med['ours_changed'] / med['ours_full']:.2f}" if "ours_changed" in med else ""))  # fmt: skip
        for k, split in r["ours_split_median"].items():
            print(f"  {k} split (medians): " + ", ".join(f"{p} {s:.3f} s" for p, s in split.items()))
    smol = next((r["median_seconds"] for r in results if r["model"] == "smollm2"), None)
    if smol:
        print(f"target: SmolLM2 full update <= 0.5 s or <= bare + a small margin: {smol['ours_full']:.3f} s, bare {smol['bare']:.3f} s")
    print(describe(m))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"config": asdict(cfg), "machine": m, "rows": results}
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    from transformers import HfArgumentParser

    main(HfArgumentParser(BenchConfig).parse_args_into_dataclasses()[0])
