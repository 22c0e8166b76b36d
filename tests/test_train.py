"""The training machinery: schedule, optimiser groups, config checks, sharded sampling, the loop (determinism,
gradient accumulation, exact resume after a crash, DDP on gloo), data collation, and the CLI stages on tiny data."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from medmap_fast.data.study import Study
from medmap_fast.train.checkpoint import CHECKPOINT_NAME
from medmap_fast.train.config import load_config
from medmap_fast.train.data import StudyCollate, load_studies, stratified_split
from medmap_fast.train.distributed import DistributedContext, ShardedSampler, init_distributed, shutdown
from medmap_fast.train.loop import TrainConfig, WarmupCosine, fit, param_groups

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


@pytest.mark.parametrize(
    "values, match",
    [({"epochs": 0}, "epochs"), ({"amp": "fp8"}, "amp"), ({"warmup_fraction": 1.0}, "warmup_fraction"),
     ({"lr": -1}, "lr"), ({"batchsize": 4}, "unknown keys")],
)
def test_train_config_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_load_config_merges_and_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nencoder: {embed_dim: 12}\nfinetune: {train: {epochs: 2}}\n")
    config = load_config(path)
    assert config["seed"] == 3 and config["encoder"]["embed_dim"] == 12 and config["encoder"]["patch_size"] == 2
    assert config["finetune"]["train"] == {"epochs": 2}
    path.write_text("pretrian: {}\n")
    with pytest.raises(ValueError, match="pretrian"):
        load_config(path)
    path.write_text("data: {sise: 32}\n")
    with pytest.raises(ValueError, match="sise"):
        load_config(path)


def test_repository_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("demo.yaml", "demo_quick.yaml", "paper.yaml"):
        config = load_config(root / name)
        assert config["data"]["source"] == "demo"
    paper = load_config(root / "paper.yaml")
    assert paper["data"]["size"] == 96 and paper["encoder"]["embed_dim"] == 48


# ---------------------------------------------------------------------------------------------------------------
# sampling and splitting


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


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 20 + [1] * 10 + [2] * 3
    train, test = stratified_split(labels, 0.3, seed=1)
    assert sorted(train + test) == list(range(33)) and len(test) == round(0.3 * 33)
    per_class = [sum(labels[i] == c for i in test) for c in range(3)]
    assert per_class[0] == 6 and per_class[1] == 3 and per_class[2] in (0, 1)
    assert stratified_split(labels, 0.3, seed=1) == (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split([0, 1], 0.1, seed=0)


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


def toy_loss(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return loss, {"mse": float(loss.detach())}


def _train_toy(config: TrainConfig, dropout: float = 0.0, run_dir=None, step_loss=toy_loss, ctx=CPU):
    torch.manual_seed(123)
    model = Toy(dropout)
    history = fit(model, toy_data(), toy_collate, step_loss, config, ctx, run_dir, progress=False)
    return model, history


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_learns_and_is_deterministic():
    config = TrainConfig(epochs=6, batch_size=4, lr=1e-2, log_every=1, seed=5)
    a, log_a = _train_toy(config, dropout=0.2)
    b, log_b = _train_toy(config, dropout=0.2)
    untimed = lambda log: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in log]  # wall time varies
    assert _same_weights(a, b) and untimed(log_a) == untimed(log_b)
    steps = [h for h in log_a if "loss" in h]
    assert len(steps) == 6 * 6 and steps[-1]["step"] == 36
    assert sum(h["loss"] for h in steps[-6:]) < 0.5 * sum(h["loss"] for h in steps[:6])
    assert steps[0]["lr"] < steps[3]["lr"]  # warm-up


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
    assert len(log) == len(ref_log)
    for h, r in zip(log, ref_log):
        assert {k: v for k, v in h.items() if k != "elapsed_s"} == {k: v for k, v in r.items() if k != "elapsed_s"}

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
        model, _ = _train_toy(TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=3), ctx=ctx)
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)
    os._exit(0)  # results are saved; skip interpreter finalisation, where gloo's threads can still abort (SIGABRT)


def test_ddp_on_gloo_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single, _ = _train_toy(TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=3))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(states[0][key], states[1][key])
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# collation of studies


def _study(i: int, modalities: tuple[str, ...], report: str, label: int) -> Study:
    volume = torch.full((len(modalities), 4, 4, 4), float(i))
    return Study(f"s{i}", "brain", modalities, volume, (1.0, 1.0, 1.0), report, label)


class _FakeTable:
    dim = 3

    def lookup(self, texts):
        return torch.tensor([[float(len(t)), 0.0, 0.0] for t in texts])


def test_collate_shares_identical_reports_and_subsets_modalities():
    studies = [_study(0, ("T1", "T2", "FLAIR"), "normal", 0), _study(1, ("DWI",), "infarct", 2),
               _study(2, ("T2", "ADC"), "normal", 0)]
    batch = StudyCollate(reports=_FakeTable())(studies)
    assert batch["num_studies"] == 3 and batch["labels"].tolist() == [0, 2, 0]
    assert batch["study_index"].tolist() == [0, 0, 0, 1, 0, 0]  # studies 0 and 2 share the report "normal"
    assert batch["report_embeddings"][:, 0].tolist() == [6.0, 7.0]
    assert batch["modality_ids"].tolist() == [0, 2, 3, 4, 2, 5]

    torch.manual_seed(0)
    sub = StudyCollate(max_volumes=1)(studies)
    assert sub["study_index"].tolist() == [0, 1, 2] and sub["volumes"].shape == (3, 1, 4, 4, 4)
    assert sub["volumes"][:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # each volume still from its own study
    with pytest.raises(ValueError, match="max_volumes"):
        StudyCollate(max_volumes=0)


def test_collate_augment_flips_a_study_jointly_and_rescales_each_volume():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 4, generator=g)
    study = Study("s", "brain", ("T1", "T2", "FLAIR"), base.expand(3, -1, -1, -1).clone(), (1.0,) * 3, "r", 0)
    torch.manual_seed(3)
    first = StudyCollate(augment=True)([study] * 4)["volumes"][:, 0]
    torch.manual_seed(3)
    assert torch.equal(first, StudyCollate(augment=True)([study] * 4)["volumes"][:, 0])  # seeded: reproducible
    flips = [()] + [(a,) for a in range(3)] + [(0, 1), (0, 2), (1, 2), (0, 1, 2)]
    used = set()
    for s in range(4):
        axes = []
        for v in first[3 * s : 3 * s + 3]:  # each volume = a * flip(base) + b, the same flip for the whole study
            fits = [f for f in flips if _affine_residual(v, base.flip(f) if f else base) < 1e-5]
            assert len(fits) == 1, fits
            axes.append(fits[0])
        assert len(set(axes)) == 1, axes
        used.add(axes[0])
        assert not torch.allclose(first[3 * s], first[3 * s + 1])  # its own intensity change per volume
    assert len(used) > 1, used  # the flips are drawn per study


def _affine_residual(y: torch.Tensor, x: torch.Tensor) -> float:
    """Relative residual of the least-squares fit y = a * x + b."""
    design = torch.stack([x.flatten(), torch.ones(x.numel())], 1).double()
    coef = torch.linalg.lstsq(design, y.flatten().double()[:, None]).solution
    return float((design @ coef - y.flatten().double()[:, None]).norm() / y.double().norm())


def test_demo_studies_are_the_same_with_parallel_generation():
    data = {"source": "demo", "num_studies": 6, "size": 16, "test_fraction": 0.5}
    serial = load_studies({**data, "num_workers": 0}, seed=1)
    parallel = load_studies({**data, "num_workers": 2}, seed=1)
    assert [s.study_id for s in serial.train] == [s.study_id for s in parallel.train]
    for a, b in zip(serial.train + serial.test, parallel.train + parallel.test):
        assert torch.equal(a.volume, b.volume) and a.report == b.report and a.label == b.label


# ---------------------------------------------------------------------------------------------------------------
# the CLI stages end to end on tiny data


TINY = """
seed: 0
data: {source: demo, num_studies: 10, size: 16, test_fraction: 0.3}
encoder: {embed_dim: 12, patch_size: 4, window_size: 2, depths: [1, 1], num_heads: [3, 6]}
text: {cache_dir: CACHE}
pretrain: {max_volumes: 2, model: {embed_dim: 16}, train: {epochs: 1, batch_size: 4}}
finetune: {model: {dim: 16, depth: 1, num_heads: 2}, train: {epochs: 1, batch_size: 4}}
evaluate: {batch_size: 8}
"""


def test_cli_pretrain_finetune_evaluate(tmp_path, capsys):
    from medmap_fast.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("CACHE", str(tmp_path / "cache")))
    common = ["--config", str(config), "--no-progress"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "s1")]) == 0
    stage1 = json.loads((tmp_path / "s1" / "metrics.json").read_text())["pretrain"]
    assert 0.0 <= stage1["retrieval_r1"] <= stage1["retrieval_r5"] <= 1.0 and stage1["num_studies"] == 3
    assert (tmp_path / "s1" / "model" / "encoder" / "model.safetensors").is_file()

    assert main(["finetune", *common, "--init", str(tmp_path / "s1" / "model"), "--out", str(tmp_path / "s2")]) == 0
    test = json.loads((tmp_path / "s2" / "metrics.json").read_text())["test"]
    assert test["num_samples"] == 3 and len(test["class_names"]) == 13

    assert main(["evaluate", "--model", str(tmp_path / "s2" / "model"), "--no-progress",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == test  # the saved classifier reloads exactly
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "s1" / "model"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["pretrain"] == stage1

    from medmap_fast.train.finetune import load_classifier  # a damaged saved classifier: errors name the file

    saved = tmp_path / "s2" / "model"
    weights, meta = saved / "classifier.safetensors", saved / "classifier.json"
    good_weights, good_meta = weights.read_bytes(), meta.read_text()
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match=r"model/classifier\.safetensors: not a readable safetensors file"):
        load_classifier(saved)
    weights.write_bytes(good_weights)
    for text, pattern in [("{", "not valid JSON"), ("{}", r"describes no valid MedMAPClassifier \(KeyError")]:
        meta.write_text(text)
        with pytest.raises(ValueError, match=r"model/classifier\.json: " + pattern):
            load_classifier(saved)
    meta.write_text(good_meta)
    assert load_classifier(saved)[1]["class_names"] == test["class_names"]
