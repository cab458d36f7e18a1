"""Pass@k difficulty curation: how often the policy already answers each training sample, before training.

    python curate.py --config run.yaml --out difficulty.jsonl --k 8 --pass_key llm --pass_threshold 0.5
    python curate.py --config run.yaml --out difficulty.jsonl --shard 1 4      # process 1 of 4, a disjoint slice
    torchrun --nproc_per_node 4 curate.py --config run.yaml --out difficulty.jsonl   # a shard per process (per vLLM TP group)
    python train_grpo.py --config run.yaml --difficulty difficulty.jsonl --keep_pass_rate 0.1 0.9

Every train_grpo.py flag is accepted and means what it means there (grpo_config.Config): the engine
(train_grpo.make_engine), the prompt (data.build_messages with --think_tag/--one_shot), the sampling
(train_grpo.sampling_settings) and the reward (train_grpo.make_reward: preset, judge, embedder, weights)
are the training run's own, and the rollout and scoring are train_grpo.roll_out and score_groups. Each
sample gets k completions and one JSONL line: id, k, pass (completions whose --pass_key component is
at least --pass_threshold), pass_rate, the mean and (population) std of every component, how many were
scored, and `settings` (the model and its weights' fingerprint as eval_manifest records it, prompt,
sampling, reward, k, pass rule). A sample with a completion its --pass_key could not score (a failed judge
call: None here even where training scores it 0) is not written, and a rerun rates it. A group that all pass or all fail has zero advantage in GRPO: the
medium band is where rollouts teach (MedVLThinker's offline curation; DAPO filters the same online).

Resumable by id: rated samples are skipped. Each record is one write() to a file opened for append, under
an exclusive flock, so a kill -9 loses at most the batch in flight; a torn last line is cut on start
(eval_files.jsonl_lines, as evaluate.py's results). Several processes may share one file: each takes
--shard I N; before each write a process reads what the others appended, so an id is written once even
when slices overlap. A file from other settings is refused in one line. train_grpo.py reads it with `keep_band` (setup).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

from grpo_config import REWARD_KEYS

TRAIN_COMPARED = ("fingerprint", "prompt", "sampling", "reward")  # what must match the training run
APPEND_COMPARED = (*TRAIN_COMPARED, "k", "pass_key", "pass_threshold")  # and what must match to add to a file
RECORD_KEYS = ("id", "k", "pass", "mean", "std", "settings")


# ---------------------------------------------------------------------------------------------
# What produced a record, and the records of a file


def settings(cfg, k: int = 0, pass_key: str = "", pass_threshold: float = 0.0) -> dict:
    """The model, prompt, sampling and reward of `cfg` (after train_grpo.make_judge resolved judge_model)."""
    from eval_policy import model_fingerprint
    from policy import policy_dtype

    embed = cfg.w_embed if cfg.embedder else 0.0  # as train_grpo.make_reward
    return {
        "model": cfg.model, "fingerprint": model_fingerprint(cfg.model, "--model"),
        "prompt": {"think_tag": cfg.think_tag, "one_shot": cfg.one_shot},
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_completion_length": cfg.max_completion_length},
        "reward": {"preset": cfg.reward_preset, "accuracy": "judge" if cfg.judge_url else "exact match", "judge_model": cfg.judge_model,
                   "embedder": cfg.embedder if embed else "", "w_llm": cfg.w_llm, "w_embed": embed, "w_modality": cfg.w_modality,
                   "w_format": cfg.w_format, "partial_format": cfg.partial_format, "on_judge_failure": cfg.on_judge_failure},
        "k": k, "pass_key": pass_key, "pass_threshold": pass_threshold,
        "engine": cfg.engine, "dtype": policy_dtype(cfg), "seed": cfg.seed, "data": cfg.data,
    }  # fmt: skip


def mismatch(have: dict, want: dict, keys) -> str | None:
    """The first of `keys` where a record's settings differ from this run's, said in words; None if none."""
    for key in keys:
        a, b = have.get(key), want.get(key)
        if a == b:
            continue
        if key == "fingerprint":
            return f"it rates the model {have.get('model')!r} (weights {a}), not this run's --model {want['model']!r} (weights {b})"
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
            return f"it was made with {key} {sub}={a.get(sub)!r}, this run has {b.get(sub)!r}"
        return f"it was made with {key}={a!r}, this run has {b!r}"
    return None


def check_record(rec: dict, where: str, want: dict, keys, ids) -> None:
    """One line's record: its fields, its settings against `want`, its id among `ids`; else a one-line SystemExit."""
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise SystemExit(f"{where}: not a curation record (no {', '.join(missing)}): made by curate.py?")
    k, passed = rec["k"], rec["pass"]
    if not (isinstance(k, int) and k >= 1 and isinstance(passed, int) and 0 <= passed <= k and isinstance(rec["settings"], dict)):
        raise SystemExit(f"{where}: a curation record needs k >= 1 and 0 <= pass <= k (got k={k!r}, pass={passed!r})")
    why = mismatch(rec["settings"], want, keys)
    if why:
        raise SystemExit(f"{where}: {why} (curate again with this run's settings, or into another file)")
    if str(rec["id"]) not in ids:
        raise SystemExit(f"{where}: sample id {rec['id']!r} is not in --data {want['data']} (a file curated from other data?)")


def read_records(path, want: dict, keys, ids, *, repair: bool = False) -> dict[str, dict]:
    """The checked records of a curation file by id (a file that is not there: none). A torn last line
    is skipped (cut off with `repair`); any other bad line stops in one line naming the file and line."""
    import eval_files

    out = {}
    try:
        for n, rec in eval_files.jsonl_lines(path, repair=repair):
            check_record(rec, f"{path}:{n}", want, keys, ids)
            out[str(rec["id"])] = rec
    except eval_files.ResultsError as e:
        raise SystemExit(str(e)) from None
    return out


def in_band(rec: dict, low: float, high: float) -> bool:
    rate = rec["pass"] / rec["k"]
    return low - 1e-9 <= rate <= high + 1e-9  # 1/8 = 0.125 and a typed 0.125 are the same rate


def keep_band(cfg, samples: list, known_ids: set, rank: int = 0) -> tuple[list, dict]:
    """Training's side (train_grpo.setup): the samples whose pass rate in `cfg.difficulty` lies within
    `cfg.keep_pass_rate` (inclusive), and the counts kept and dropped (printed, and in the run header).
    A sample the file does not rate is left out too. `known_ids`: every id of --data, before --text_only."""
    low, high = cfg.keep_pass_rate
    records = read_records(cfg.difficulty, settings(cfg), TRAIN_COMPARED, known_ids)
    rated = [records[s.id] for s in samples if s.id in records]
    kept = [s for s in samples if s.id in records and in_band(records[s.id], low, high)]
    counts = {"file": cfg.difficulty, "keep_pass_rate": [low, high], "samples": len(samples), "kept": len(kept),
              "below": sum(r["pass"] / r["k"] < low - 1e-9 for r in rated), "above": sum(r["pass"] / r["k"] > high + 1e-9 for r in rated),
              "not_rated": len(samples) - len(rated),
              "kept_ids": hashlib.sha256("\n".join(s.id for s in kept).encode()).hexdigest()[:16]}  # fmt: skip
    check_resumed_band(cfg, counts)
    if rank == 0:
        print(f"difficulty {cfg.difficulty}: kept {len(kept)} of {len(samples)} samples with pass rate in [{low:g}, {high:g}]; "
              f"dropped {counts['below']} below, {counts['above']} above, {counts['not_rated']} not rated")  # fmt: skip
    if not kept:
        raise SystemExit(f"--difficulty {cfg.difficulty}: no sample's pass rate is within --keep_pass_rate {low:g} {high:g} "
                         f"({len(rated)} rated: {counts['below']} below, {counts['above']} above)")  # fmt: skip
    return kept, counts


def check_resumed_band(cfg, counts: dict) -> None:
    """On --resume from a checkpoint: the same kept samples as the run header says the run started with. The file
    grows while curation goes on, and the saved data position indexes the kept samples (prompt_sampler)."""
    from checkpoints import last_checkpoint

    out = Path(cfg.output_dir)
    log = out / "log.jsonl"
    if not cfg.resume or cfg.allow_config_change or not last_checkpoint(out) or not log.is_file():
        return
    first = json.loads(log.read_text().split("\n", 1)[0] or "{}")
    old = first.get("run", {}).get("difficulty") or {}
    if old.get("kept_ids", counts["kept_ids"]) != counts["kept_ids"]:  # a header without the digest: an older run
        raise SystemExit(f"--resume: --difficulty {cfg.difficulty} now keeps {counts['kept']} samples, not the {old['kept']} the run "
                         "started with (the file changed); pass --allow_config_change to continue with them anyway, or start afresh "
                         "with another --output_dir")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Writing: one process or several on one file


class RecordFile:
    """Appends records to a curation file shared by processes: each write under an exclusive flock, after
    reading what the others appended since (so no id is written twice)."""

    def __init__(self, path: Path, want: dict, ids: set):
        self.path, self.want, self.ids = path, want, ids
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with self.locked():  # no other process is mid-write: a torn last line is a killed run's, and is cut
            self.done = set(read_records(path, want, APPEND_COMPARED, ids, repair=True))
            with open(path, "rb") as f:
                self.pos, self.lines = os.path.getsize(path), sum(1 for _ in f)

    @contextlib.contextmanager
    def locked(self):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def catch_up(self) -> None:
        """The ids other processes appended since we last looked (whole lines only: writes are locked)."""
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            new = f.read()
        new = new[: new.rfind(b"\n") + 1]
        self.pos += len(new)
        for line in new.decode("utf-8").splitlines():
            self.lines += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{self.path}:{self.lines}: not JSON: {e}") from None
            check_record(rec, f"{self.path}:{self.lines}", self.want, APPEND_COMPARED, self.ids)
            self.done.add(str(rec["id"]))

    def append(self, rec: dict) -> bool:
        """Write `rec` as one line unless its id is there already; True when written."""
        line = (json.dumps(rec) + "\n").encode()
        with self.locked():
            self.catch_up()
            if rec["id"] in self.done:
                return False
            view = memoryview(line)
            while view:  # one write() in practice; a partial write of a huge line goes on where it stopped
                view = view[os.write(self.fd, view) :]
            self.done.add(rec["id"])
        return True

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------
# Rating


def record(group, k: int, pass_key: str, pass_threshold: float, made_by: dict) -> dict:
    """A sample's line from its scored group (train_grpo.Group): a component's None (could not score) is
    left out of its mean and std and never passes."""
    scored = {key: [v for v in values if v is not None] for key, values in group.scores.items()}
    passed = sum(v >= pass_threshold for v in scored[pass_key])
    return {
        "id": group.sample.id, "k": k, "pass": passed, "pass_rate": passed / k,
        "mean": {key: statistics.fmean(v) if v else None for key, v in scored.items()},
        "std": {key: statistics.pstdev(v) if v else None for key, v in scored.items()},
        "scored": {key: len(v) for key, v in scored.items()}, "settings": made_by,
    }  # fmt: skip


def batch_seed(seed: int, ids: list[str]) -> int:
    """The sampling seed of a batch: the same batch samples the same completions again."""
    return (zlib.crc32("\n".join(ids).encode()) ^ (seed * 0x9E3779B1)) % 2**31


def prompt_processor(cfg):
    """The trainer's processor (policy.load_policy): a VLM's images at the run's --min_pixels/--max_pixels."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    import rollout

    if rollout.is_vlm(AutoConfig.from_pretrained(cfg.model)):
        return AutoProcessor.from_pretrained(cfg.model, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return AutoTokenizer.from_pretrained(cfg.model)


def make_engine(cfg, run, processor):
    """train_grpo.make_engine's engine without a trainer: vLLM never asleep (no weights come to wake it)."""
    import rollout
    import train_grpo
    from policy import policy_dtype

    if cfg.engine == "hf":
        import torch

        return rollout.HFRollout(cfg.model, processor, dtype=getattr(torch, policy_dtype(cfg)), device="cuda" if torch.cuda.is_available() else None)
    from types import SimpleNamespace

    from transformers import AutoConfig

    run.model = SimpleNamespace(config=AutoConfig.from_pretrained(cfg.model))  # what make_engine reads of the policy
    return train_grpo.make_engine(dataclasses.replace(cfg, sleep_level=0), run)


def main(cfg, args) -> dict:
    """Rate this process's slice of the data; returns the counts and seconds."""
    import data
    import rollout
    import train_grpo

    if not cfg.verbose:
        rollout.quiet_logs()
    try:
        samples = data.load_training_data(cfg.data, on_error="skip" if cfg.skip_bad_samples else "raise")
    except data.DataError as e:
        raise SystemExit(str(e)) from None
    ids = {s.id for s in samples}
    if cfg.text_only:
        samples = [s for s in samples if not s.images]
    samples = samples[: args.limit or None]
    shard, shards = args.shard
    mine = samples[shard::shards]
    run = train_grpo.Run()
    run.world, run.rank, run.tp_group, run.samples, run.val_samples = 1, 0, None, samples, []
    judge = train_grpo.make_judge(cfg)  # resolves cfg.judge_model, part of the settings
    made_by = settings(cfg, args.k, args.pass_key, args.pass_threshold)
    out = RecordFile(Path(args.out), made_by, ids)
    todo = [s for s in mine if s.id not in out.done]
    print(f"curate: shard {shard} of {shards}: {len(mine)} samples, {len(mine) - len(todo)} already in {args.out}, {len(todo)} to rate at k={args.k}")
    stats = {"rated": 0, "skipped": 0, "duplicates": 0, "unscored_samples": 0, "seconds_rollout": 0.0, "seconds_reward": 0.0}
    if not todo:
        return stats
    # A failed judge call is no answer about the sample: None (not medix-r1's 0, which would rate it as failed); such a
    # sample is left unwritten for a rerun. The values of every call that succeeds are the training reward's.
    run.reward = train_grpo.make_reward(dataclasses.replace(cfg, on_judge_failure="drop"), 0, judge)
    processor = prompt_processor(cfg)  # prompt lengths as training counts them (the vLLM engine's own has default image sizes)
    engine = run.engine = make_engine(cfg, run, processor)
    cfg_k = dataclasses.replace(cfg, group_size=args.k)  # roll_out draws group_size completions a prompt
    counts = collections.defaultdict(int)  # score_groups' counters (judge failures, unscored completions ...)
    try:
        for at in range(0, len(todo), args.batch_prompts):
            groups = []
            for s in todo[at : at + args.batch_prompts]:
                if s.id in out.done:  # another process rated it meanwhile
                    continue
                try:
                    messages = data.build_messages(s, think_tag=cfg.think_tag, one_shot=cfg.one_shot)
                except data.DataError as e:
                    if not cfg.skip_bad_samples:
                        raise SystemExit(f"{e} (--skip_bad_samples skips such samples)") from None
                    print(f"skipped bad sample: {e}")
                    stats["skipped"] += 1
                    continue
                length = rollout.encode_prompts(processor, [messages])["input_ids"].shape[1]
                if length > cfg.max_prompt_length:
                    print(f"skipped: sample {s.id!r}: prompt of {length} tokens > max_prompt_length (training skips it too)")
                    stats["skipped"] += 1
                    continue
                groups.append(train_grpo.Group(s, messages, None))
            if not groups:
                continue
            t = time.perf_counter()
            sampling = dataclasses.replace(train_grpo.sampling_settings(cfg), seed=batch_seed(cfg.seed, [g.sample.id for g in groups]))
            train_grpo.roll_out(cfg_k, run, groups, sampling)
            t2 = time.perf_counter()
            train_grpo.score_groups(run, groups, counts)
            stats["seconds_rollout"] += t2 - t
            stats["seconds_reward"] += time.perf_counter() - t2
            for g in groups:
                unscored = sum(v is None for v in g.scores[args.pass_key])
                if unscored:  # a pass count over fewer than k would read as failures
                    print(f"curate: sample {g.sample.id!r}: {unscored} of {args.k} completions could not be scored on {args.pass_key} "
                          "(judge failures?): not written, a rerun rates it")  # fmt: skip
                    stats["unscored_samples"] += 1
                    continue
                written = out.append(record(g, args.k, args.pass_key, args.pass_threshold, made_by))
                stats["rated" if written else "duplicates"] += 1
            print(f"curate: {stats['rated']} of {len(todo)} rated ({stats['seconds_rollout'] + stats['seconds_reward']:.0f} s)", flush=True)
    finally:
        engine.close()
        out.close()
    seconds = stats["seconds_rollout"] + stats["seconds_reward"]
    print(f"curate: {stats['rated']} rated in {seconds / 60:.1f} min ({seconds / 60 / max(stats['rated'], 1) * 100:.1f} min per 100 samples), "
          f"{stats['skipped']} skipped, {stats['unscored_samples']} not scored (rerun to rate them); judge failures {counts['judge_failures']}, unscored completions {counts['completions_unscored']}")  # fmt: skip
    return {**stats, **counts}


def parse_args(argv=None):
    """(the training Config, this script's own flags): ours are read here, every other flag by grpo_config."""
    from grpo_config import parse_config

    ap = argparse.ArgumentParser(
        prog="curate.py", allow_abbrev=False, description=__doc__.split("\n")[0],
        epilog="Every train_grpo.py flag is accepted too, with its meaning there (python train_grpo.py --help).")  # fmt: skip
    ap.add_argument("--out", required=True, help="The curation file (JSONL): appended to, resumed by id.")
    ap.add_argument("--k", type=int, default=0, help="Completions per sample (0: --group_size).")
    ap.add_argument("--pass_key", default="llm", choices=REWARD_KEYS, help="The reward component a pass reads.")
    ap.add_argument("--pass_threshold", type=float, default=0.5, help="A completion passes when its pass_key value is at least this.")
    ap.add_argument("--shard", type=int, nargs=2, metavar=("I", "N"),
                    help="This process takes samples I, I+N, I+2N, ... (default: all; under torchrun, its rank's share).")
    ap.add_argument("--batch_prompts", type=int, default=16, help="Samples per engine call (a kill -9 loses at most these).")
    ap.add_argument("--limit", type=int, default=0, help="Rate the first N samples only (0: all).")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(rest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: one argv for all; a vLLM tensor-parallel group's processes generate together, one shard a group
        if args.shard:
            raise SystemExit(f"curate.py: --shard under torchrun (WORLD_SIZE {world}): each process takes its shard from RANK; leave --shard out")
        tp = cfg.tensor_parallel_size if cfg.engine == "vllm" else 1
        args.shard = [int(os.environ.get("RANK", "0")) // tp, world // tp]
    args.shard = args.shard or [0, 1]
    shard, shards = args.shard
    if not 0 <= shard < shards:
        raise SystemExit(f"curate.py: --shard {shard} {shards}: I must be in 0..N-1")
    if args.k < 0 or args.batch_prompts < 1 or args.limit < 0:
        raise SystemExit("curate.py: --k and --limit must be at least 0, --batch_prompts at least 1")
    if cfg.warm_start_steps:
        raise SystemExit("curate.py: --warm_start_steps: curation rates --model as it is; save the warm start as a model "
                         "(bench/learning_curve.py warm_start) and pass that as --model, here and to the training run")  # fmt: skip
    weights = {"total": 1, "llm": cfg.w_llm, "embed": cfg.w_embed if cfg.embedder else 0, "modality": cfg.w_modality, "format": cfg.w_format}
    if not weights[args.pass_key]:  # as train_grpo.make_reward: a component off is None for every completion
        raise SystemExit(f"curate.py: --pass_key {args.pass_key}: that reward component is off in this run (weight 0"
                         f"{', no --embedder' if args.pass_key == 'embed' else ''}); choose another --pass_key")  # fmt: skip
    args.k = args.k or cfg.group_size
    return cfg, args


if __name__ == "__main__":
    main(*parse_args())
