"""The trainer's state off the GPU while the engine is awake (policy.Offload, offload_during_rollout) and weights loaded
so that no GPU holds a whole copy before sharding (policy.load_policy / load_reference / place).

This machine has no GPU, so what a move to CPU memory does is shown through stand-ins, each saying what it stands for:
- moving CPU tensors to "cpu" would do nothing, so Offload copies them into new memory when source and target are the
  same device: a tensor the offload forgot keeps its old storage, which the tests see (the old storages are kept
  alive, so the allocator cannot hand the same address back). On a GPU the same code copies GPU -> CPU; what only a
  GPU adds is the memory given back (torch.cuda.memory_allocated) and the optimiser stepping on restored states.
- the load path runs with torch.cuda.is_available patched true and a TorchFunctionMode that records every tensor
  sent to a CUDA device (and leaves it where it is): what load_policy would have put on the GPU before sharding.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import policy
import train_grpo
from tests.kit import REPO, tiny_text_dir, tiny_vlm_dir
from tests.test_rollout_torchrun import _free_port
from tests.test_train_grpo import write_data


def _trained(master_dtype: str):
    """A tiny model after one optimiser step, with gradients of a second backward still held."""
    from transformers import AutoModelForCausalLM

    import optim

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir("qwen2"), dtype=getattr(torch, master_dtype))
    cfg = train_grpo.Config(master_dtype=master_dtype, dtype="bfloat16" if master_dtype == "bfloat16" else "float32")
    opt = optim.build_optimizer(cfg, list(model.parameters()))
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        if not opt.state:
            opt.step()
    return model, opt


def _tensors(model, opt) -> dict:
    out = {n: p for n, p in model.named_parameters()} | {f"{n}.grad": p.grad for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    return out | {f"{names[id(p)]}.{k}": v for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("master_dtype", ["float32", "bfloat16"])  # torch AdamW; torch-optimi's Kahan AdamW (kahan_comp)
def test_offload_moves_every_parameter_gradient_and_optimiser_state_and_back_bit_exact(master_dtype):
    model, opt = _trained(master_dtype)
    params = list(model.parameters())
    before = {n: (t.untyped_storage(), t.clone()) for n, t in _tensors(model, opt).items()}
    assert any(n.endswith(".kahan_comp") for n in before) == (master_dtype == "bfloat16")
    off = policy.Offload([model], opt, "cpu")
    off.stow(models=False)  # the optimiser state only (after the update)
    moved = {n for n, t in _tensors(model, opt).items() if t.untyped_storage().data_ptr() != before[n][0].data_ptr()}
    assert moved == {n for n in before if n.endswith((".exp_avg", ".exp_avg_sq", ".step", ".kahan_comp"))}
    off.stow()  # and the model: every parameter and gradient
    stowed = _tensors(model, opt)
    assert [n for n, t in stowed.items() if t.untyped_storage().data_ptr() == before[n][0].data_ptr()] == []
    assert all(torch.equal(t, before[n][1]) for n, t in stowed.items())
    off.stow()  # a second stow moves nothing
    assert all(t is _tensors(model, opt)[n] for n, t in stowed.items())
    off.restore()
    assert all(p is q for p, q in zip(model.parameters(), params))  # the optimiser's parameter objects
    assert all(torch.equal(t, before[n][1]) for n, t in _tensors(model, opt).items())
    opt.step()  # the optimiser steps on the restored state


class CudaMoves(TorchFunctionMode):
    """Records the bytes of every tensor sent to a CUDA device and leaves it where it is (this machine has none)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if func is torch.Tensor.cuda or (isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda"):
                self.bytes += args[0].numel() * args[0].element_size()
                return args[0]
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3_vl"])
def test_loading_puts_no_whole_model_on_the_gpu_before_sharding(monkeypatch, kind):
    # A CUDA machine as the loaders see it: is_available patched; CudaMoves records what would go to the GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    path = str(tiny_text_dir(kind) if kind == "qwen2" else tiny_vlm_dir(kind))
    cfg = train_grpo.Config(model=path, master_dtype="float32", dtype="bfloat16")
    with CudaMoves() as moves:
        model, _ = policy.load_policy(cfg, path)
        ref = policy.load_reference(path, torch.bfloat16)
    assert moves.bytes == 0  # before: the whole float32 policy and the bf16 reference, each moved whole
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    sharded = []
    monkeypatch.setattr(policy, "shard", lambda m, dtype: sharded.append(m))
    with CudaMoves() as moves:  # several processes: FSDP2's fully_shard moves each block and keeps its shard
        policy.place(model, torch.bfloat16, 8, torch.device("cuda", 0))
        policy.place(ref, torch.bfloat16, 8, torch.device("cuda", 0))
    assert moves.bytes == 0 and sharded == [model, ref]
    with CudaMoves() as moves:  # one process: nothing to shard, the whole model is what trains (the recorder sees it)
        policy.place(model, torch.bfloat16, 1, torch.device("cuda", 0))
    assert moves.bytes >= size


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("offload")
    write_data(out / "train.jsonl", n=16)
    tiny_text_dir("qwen2")  # built here once, so the ranks do not race for it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "offload_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_fsdp2_ranks_train_the_same_weights_with_the_trainer_offloaded(ranks):
    for r in ranks:
        on, off = r["True"], r["False"]
        assert on["sharded"] and off["sharded"]
        # Two steps: stowed at setup, then per step: restore, optimiser state stowed, parameters stowed.
        assert [s["models"] for s in on["stows"]] == [False, True] * 2 and len(on["restores"]) == 3  # 2 steps + the end
        assert all(s["expected"] > 0 and s["left_behind"] == [] and s["changed_bits"] == [] for s in on["stows"])
        assert all(x["same_objects"] and x["changed_bits"] == [] for x in on["restores"])
        assert on["weights"] == off["weights"]  # bit for bit
    assert ranks[0]["True"]["weights"] == ranks[1]["True"]["weights"]


def test_a_resumed_run_loads_the_optimiser_state_where_the_awake_engine_is_not_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Issue 24: resuming the 30B recipe. The optimiser state must never be loaded while the engine is awake (it
    would sit on the GPU beside the engine); at the engine's start and at setup's end it is stowed. The engine here is
    the transformers one holding its own copy of the model (weights copied in at each sync, as vLLM's), so the
    offload is on; a resumed run equals an uninterrupted one."""
    from rollout import HFRollout
    from tests.test_train_grpo import config, params, toy_reward

    awake, seen = [False], []

    class OwnCopy(HFRollout):  # not the trainer's model object: offload_during_rollout applies
        def sleep(self):
            awake[0] = False

        def wake_up(self):
            awake[0] = True

    def make_engine(cfg, run):
        if run.optimizer.state:  # a resumed optimiser is stowed before the engine starts
            seen.append(("engine starts", run.offload is not None and run.offload.state_homes is not None))
        awake[0] = True
        return OwnCopy(cfg.model)

    monkeypatch.setattr(train_grpo, "make_engine", make_engine)
    loads = []  # per optimiser state load (set_optimizer_state_dict ends in load_state_dict): was the engine awake?
    original = torch.optim.Optimizer.load_state_dict

    def recording_load(self, *a, **k):
        loads.append(awake[0])
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", recording_load)
    kw = dict(offload_during_rollout=True, save_every=1)
    one = train_grpo.main(config(tmp_path / "a", steps=2, **kw), reward_fn=toy_reward)
    train_grpo.main(config(tmp_path / "b", steps=1, **kw), reward_fn=toy_reward)
    cfg = config(tmp_path / "b", steps=2, resume=True, **kw)
    run = train_grpo.setup(cfg, toy_reward)
    assert loads == [False]  # before: [True], loaded beside the awake engine
    assert seen == [("engine starts", True)]
    assert run.optimizer.state and run.offload.state_homes is not None  # stowed at setup's end
    run.engine.close()
    two = train_grpo.main(cfg, reward_fn=toy_reward)
    a, b = params(one), params(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
