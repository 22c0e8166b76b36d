"""The training machinery: schedule, optimiser groups, config checks, sharded sampling, the loop (determinism,
gradient accumulation, exact resume after a crash, DDP on gloo) and the stage transforms of a loader's batches.
The CLI stages end to end: tests/test_cli_real_mri.py; the run config: tests/test_config.py."""

from __future__ import annotations

import copy
import math
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.data import StageBatches, keep_volumes, with_report_embeddings
from medmap_fast.train.distributed import DistributedContext, ShardedSampler, init_distributed, shutdown
from medmap_fast.train.loop import TrainConfig, WarmupCosine, adamw, fit, param_groups
from medmap_fast.train.runlog import TIMING_KEYS, read_metrics

CPU = DistributedContext()

# ---------------------------------------------------------------------------------------------------------------
# schedule, optimiser groups, configuration


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    warm = [s(t) for t in range(4)]
    assert warm == sorted(warm) and warm[0] > 0 and warm[-1] < 1  # linear ramp from above 0
    assert s(4) == pytest.approx(1.0)
    assert s(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(20) == pytest.approx(0.1) and s(25) == pytest.approx(0.1)
    cosine = [s(t) for t in range(4, 21)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_param_groups_skip_decay_on_1d_and_scale_lr_by_prefix():
    model = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), "head": nn.Linear(4, 2)})
    model["head"].bias.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05, lr=1e-3, lr_scale={"encoder.": 0.1, "encoder.1.": 0.5})
    found = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}
    enc_linear, enc_norm = model["encoder"][0], model["encoder"][1]
    assert found[(1e-4, 0.05)] == {id(enc_linear.weight)}
    assert found[(1e-4, 0.0)] == {id(enc_linear.bias)}
    assert found[(5e-4, 0.0)] == {id(enc_norm.weight), id(enc_norm.bias)}  # the longest prefix wins
    assert found[(1e-3, 0.05)] == {id(model["head"].weight)}  # the frozen bias is left out
    assert sum(len(g["params"]) for g in groups) == 5


def test_cpu_adamw_takes_the_multi_tensor_path_with_the_per_tensor_results():
    """The run's optimiser on the CPU uses AdamW's foreach path, which must not move a bit against the per-tensor
    loop that torch picks by default there (seeded CPU runs repeat bit for bit, and the README's numbers with them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    twin = copy.deepcopy(model)
    config = TrainConfig(lr=3e-3, weight_decay=0.05, lr_scale={"2.": 3.0})
    fast = adamw(model, config, torch.device("cpu"))
    groups = param_groups(twin, config.weight_decay, config.lr, config.lr_scale)
    loop = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=False)
    assert fast.defaults["foreach"] and not fast.defaults["fused"]
    for step in range(20):
        grads = [torch.randn_like(p) * (step + 1) for p in model.parameters()]
        for net, opt in ((model, fast), (twin, loop)):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize(
    "values, match",
    [({"epochs": 0}, "epochs"), ({"amp": "fp8"}, "amp"), ({"warmup_fraction": 1.0}, "warmup_fraction"),
     ({"lr": -1}, "lr"), ({"batchsize": 4}, "unknown keys"), ({"eval_every": -1}, "eval_every")],
)
def test_train_config_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_sharded_sampler_partitions_each_epoch_and_resumes_mid_epoch():
    ranks = [ShardedSampler(10, DistributedContext(rank=r, world_size=3), seed=7) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert all(len(x) == 4 for x in shards)  # padded to equal shards, like DistributedSampler
    flat = sum(shards, [])
    assert set(flat) == set(range(10)) and len(flat) == 12
    again = ShardedSampler(10, DistributedContext(rank=1, world_size=3), seed=7)
    again.set_epoch(2)
    assert list(again) == shards[1]
    again.skip(3)
    assert list(again) == shards[1][3:] and len(again) == 1
    again.set_epoch(3)
    assert list(again) != shards[1] and len(again) == 4


# ---------------------------------------------------------------------------------------------------------------
# the loop on a toy regression problem (module level so that spawned DDP workers can import it)


class Toy(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_data(n: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    return list(zip(x, y[:, None]))


def toy_collate(items):
    return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


class ToyBatches:
    """A BatchSource over the toy items: this rank's shard of a seeded shuffle, in batches."""

    def __init__(self, items, batch_size: int, ctx: DistributedContext, seed: int) -> None:
        self.items, self.batch_size = items, batch_size
        self.sampler = ShardedSampler(len(items), ctx, seed=seed)

    def __len__(self) -> int:
        return math.ceil(self.sampler.per_rank / self.batch_size)

    def epoch(self, epoch: int, skip_batches: int = 0):
        self.sampler.set_epoch(epoch)
        order = self.sampler.epoch_indices()
        for start in range(skip_batches * self.batch_size, len(order), self.batch_size):
            yield toy_collate([self.items[i] for i in order[start : start + self.batch_size]])


def toy_loss(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"mse": float(loss.detach())}


def _train_toy(config: TrainConfig, dropout: float = 0.0, run_dir=None, step_loss=toy_loss, ctx=CPU,
               on_epoch_end=None):
    torch.manual_seed(123)
    model = Toy(dropout)
    batches = ToyBatches(toy_data(), config.batch_size, ctx, config.seed)
    history = fit(model, batches, step_loss, config, ctx, run_dir, progress=False, on_epoch_end=on_epoch_end)
    return model, history


def _untimed(log: list[dict[str, float]]) -> list[dict[str, float]]:
    """The log without its wall-clock measurements (they vary between identical runs)."""
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in log]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_learns_and_is_deterministic():
    config = TrainConfig(epochs=6, batch_size=4, lr=1e-2, log_every=1, seed=5)
    a, log_a = _train_toy(config, dropout=0.2)
    b, log_b = _train_toy(config, dropout=0.2)
    assert _same_weights(a, b) and _untimed(log_a) == _untimed(log_b)
    steps = [h for h in log_a if "loss" in h]
    assert len(steps) == 6 * 6 and steps[-1]["step"] == 36
    assert sum(h["loss"] for h in steps[-6:]) < 0.5 * sum(h["loss"] for h in steps[:6])
    assert steps[0]["lr"] < steps[3]["lr"]  # warm-up


def test_epoch_evaluation_runs_in_eval_mode_and_leaves_training_untouched():
    """eval_every=2 of 5 epochs evaluates after epochs 2, 4 and 5, in eval mode without gradients; the evaluation
    draws from every random generator, yet the dropout model trains the weights of a run without evaluation."""
    seen, modes = [], []

    def evaluate(model, epoch):
        seen.append((epoch, model.training, torch.is_grad_enabled()))
        random.random(), np.random.rand(), torch.rand(1)  # e.g. a DataLoader draws its base seed
        return {"val_score": float(epoch)}

    def loss(model, batch):
        modes.append(model.training)
        return toy_loss(model, batch)

    config = dict(epochs=5, batch_size=4, lr=1e-2, log_every=1, seed=2)
    evaluated, log = _train_toy(TrainConfig(**config, eval_every=2), 0.3, step_loss=loss, on_epoch_end=evaluate)
    plain, plain_log = _train_toy(TrainConfig(**config, eval_every=0), 0.3, on_epoch_end=evaluate)
    assert seen == [(1, False, False), (3, False, False), (4, False, False)] and all(modes)
    assert [(h["epoch"], h["step"]) for h in log if h.get("epoch_end")] == [(2, 12), (4, 24), (5, 30)]
    assert _same_weights(evaluated, plain)
    assert _untimed([h for h in log if not h.get("epoch_end")]) == _untimed(plain_log)


def test_gradient_accumulation_matches_a_bigger_batch():
    big, _ = _train_toy(TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=1))
    accumulated, log = _train_toy(TrainConfig(epochs=2, batch_size=4, grad_accum=2, lr=1e-2, seed=1))
    assert max(h["step"] for h in log) == 6  # 24 items / (4 * 2) per step, 2 epochs
    for p, q in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_exactly(tmp_path):
    """Crash in epoch 3 (after a mid-epoch checkpoint), rerun: same weights and log as an uninterrupted run."""
    config = TrainConfig(epochs=4, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=2, seed=9)
    reference, ref_log = _train_toy(config, dropout=0.3)

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 16:  # the 4th micro-batch of epoch 3; step 14 is checkpointed
            raise Crash
        return toy_loss(model, batch)

    with pytest.raises(Crash):
        _train_toy(config, dropout=0.3, run_dir=tmp_path, step_loss=crashing_loss)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    resumed, log = _train_toy(config, dropout=0.3, run_dir=tmp_path)
    assert _same_weights(resumed, reference)
    assert _untimed(log) == _untimed(ref_log)

    with pytest.raises(ValueError, match="another configuration"):
        _train_toy(TrainConfig(epochs=5, batch_size=4, lr=1e-2, seed=9), run_dir=tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        evaluate = lambda model, epoch: {"val_score": float(torch.rand(1)) + rank}  # noqa: E731
        config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=3)
        model, _ = _train_toy(config, ctx=ctx, run_dir=Path(out) / "run", on_epoch_end=evaluate)
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)
    os._exit(0)  # results are saved; skip interpreter finalisation, where gloo's threads can still abort (SIGABRT)


def test_ddp_on_gloo_equals_one_process_on_the_global_batch(tmp_path):
    """Also with a per-epoch evaluation on every rank: rank 0 logs its values; training is unchanged."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single, _ = _train_toy(TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=3))
    epochs = [r for r in read_metrics(tmp_path / "run") if r.get("epoch_end")]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["val_score"] < 1 for r in epochs)  # rank 0's
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(states[0][key], states[1][key])
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the stage transforms of a loader's batches


def _batch(modalities: list[tuple[str, ...]], reports: list[str]) -> dict:
    """A loader batch (the DESIGN contract) whose volume v is filled with the value v."""
    counts = [len(m) for m in modalities]
    volumes = torch.arange(sum(counts), dtype=torch.float32)[:, None, None, None, None].expand(-1, 1, 4, 4, 4)
    ids = [["T1", "T1c", "T2", "FLAIR", "DWI", "ADC"].index(n) for m in modalities for n in m]
    return {"volumes": volumes, "modality_ids": torch.tensor(ids),
            "study_index": torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
            "num_studies": len(counts), "reports": reports, "study_ids": [f"s{i}" for i in range(len(counts))]}


class _FakeTable:
    dim = 3

    def lookup(self, texts):
        return torch.tensor([[float(len(t)), 0.0, 0.0] for t in texts])


def test_report_embeddings_are_shared_by_identical_reports():
    batch = _batch([("T1", "T2", "FLAIR"), ("DWI",), ("T2", "ADC")], ["normal", "infarct", "normal"])
    out = with_report_embeddings(batch, _FakeTable())
    assert out["study_index"].tolist() == [0, 0, 0, 1, 0, 0]  # studies 0 and 2 share the report "normal"
    assert out["report_embeddings"][:, 0].tolist() == [6.0, 7.0]
    assert out["modality_ids"].tolist() == [0, 2, 3, 4, 2, 5] and out["num_studies"] == 3


def test_keep_volumes_subsets_each_study_in_order():
    batch = _batch([("T1", "T2", "FLAIR"), ("DWI",), ("T2", "ADC")], ["a", "b", "c"])
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out = keep_volumes(batch, 2)
        assert out["study_index"].tolist()[-3:] == [1, 2, 2] and len(out["study_index"]) == 5
        first = out["volumes"][:2, 0, 0, 0, 0].tolist()
        assert first == sorted(first) and set(first) <= {0.0, 1.0, 2.0}  # study 0's own volumes, in order
        assert out["modality_ids"].tolist()[:2] == [[0, 2, 3][int(v)] for v in first]
        seen.add(tuple(first))
    assert len(seen) == 3  # every pair of study 0's three volumes is drawn
    assert torch.equal(keep_volumes(batch, 3)["volumes"], batch["volumes"])
    with pytest.raises(ValueError, match="max_volumes"):
        StageBatches([], max_volumes=0)
