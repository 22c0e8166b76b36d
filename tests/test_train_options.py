"""The model-side training options of ``TrainConfig``: ``activation_checkpointing`` (every Swin block recomputes in
the backward, the gradients unchanged) and ``compile`` (``torch.compile`` of the encoder, in place), as ``fit``
applies them. Their speed and memory against the authors' way of training: bench/bench_train_step.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import medmap_fast as mf
from medmap_fast.models.encoder import MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.models.swin_layers import SwinBlock3D
from medmap_fast.train import loop
from medmap_fast.train.distributed import DistributedContext
from medmap_fast.train.finetune import finetune_step
from medmap_fast.train.loop import TrainConfig, apply_train_options, cpu_compiler_missing, fit
from medmap_fast.train.pretrain import pretrain_step

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`-wrapped function"),
]

MODALITIES = ["T1", "T2", "FLAIR"]
TINY = dict(embed_dim=12, window_size=2, patch_size=2, depths=(2,), num_heads=(3,))


def tiny_model(stage: int, depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    encoder = MedMAPEncoder(MODALITIES, **{**TINY, "depths": (depth,)})
    if stage == 1:
        return MedMAPPretrainModel(encoder, text_dim=8, embed_dim=8)
    return MedMAPClassifier(encoder, 3, torch.randn(len(MODALITIES), 8), dim=8, depth=1, num_heads=2, dropout=0.0)


def tiny_batch() -> dict:
    """2 studies: the first with 2 volumes, the second with 1 (8x10x8: shifted and padded windows)."""
    g = torch.Generator().manual_seed(1)
    return {"volumes": torch.randn(3, 1, 8, 10, 8, generator=g), "modality_ids": torch.tensor([0, 2, 1]),
            "study_index": torch.tensor([0, 0, 1]), "report_embeddings": torch.randn(2, 8, generator=g),
            "labels": torch.tensor([2, 0]), "num_studies": 2}


STEP_LOSS = {1: pretrain_step, 2: finetune_step}


def gradients(model: nn.Module, stage: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with mf.backend("torch"):
        loss, _ = STEP_LOSS[stage](model, tiny_batch())
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("values, match", [({"compile": "yes"}, "compile"), ({"activation_checkpointing": 1},
                                                                               "activation_checkpointing")])
def test_options_must_be_bools(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_checkpointing_needs_swin_blocks() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing: expected a model with Swin blocks"):
        apply_train_options(nn.Linear(2, 2), TrainConfig(activation_checkpointing=True))


def test_compile_on_the_cpu_needs_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "cpu_compiler_missing", lambda: "no working C++ compiler among ('g++',)")
    model = tiny_model(1, depth=1)
    with pytest.raises(ValueError, match=r"compile: expected a C\+\+ compiler .* got no working C\+\+ compiler"):
        apply_train_options(model, TrainConfig(compile=True))
    assert model.encoder._compiled_call_impl is None


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpointing_recomputes_each_block_and_keeps_the_gradients(stage: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    eager = tiny_model(stage)
    checkpointed = apply_train_options(copy.deepcopy(eager), TrainConfig(activation_checkpointing=True))
    calls = []
    attention = SwinBlock3D._attention
    monkeypatch.setattr(SwinBlock3D, "_attention", lambda self, *a: calls.append(self) or attention(self, *a))
    want = gradients(eager, stage)
    blocks = len(calls)
    calls.clear()
    got = gradients(checkpointed, stage)
    assert blocks == 2 and len(calls) == 2 * blocks  # each block's attention ran again in the backward
    assert got.keys() == want.keys() and any(n.startswith("encoder.") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


class OneBatch:
    """A BatchSource of one micro-batch per epoch (the tiny batch)."""

    def __len__(self) -> int:
        return 1

    def epoch(self, epoch: int, skip_batches: int = 0):
        yield from [tiny_batch()][skip_batches:]


def fit_one_step(options: dict, depth: int = 2) -> tuple[nn.Module, list[dict]]:
    model = tiny_model(1, depth)
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, log_every=1, **options)
    with mf.backend("torch"):
        history = fit(model, OneBatch(), pretrain_step, config, DistributedContext(), progress=False)
    return model, history


def test_fit_trains_a_step_with_checkpointing_as_without() -> None:
    eager, eager_log = fit_one_step({})
    checkpointed, log = fit_one_step({"activation_checkpointing": True})
    assert all(b.use_checkpoint for b in checkpointed.modules() if isinstance(b, SwinBlock3D))
    assert log[0]["loss"] == eager_log[0]["loss"]
    for (name, a), b in zip(checkpointed.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


# Inductor builds C++ kernels for the encoder's forward and backward (one Swin block): about 2 minutes with a cold
# Inductor cache on a busy 2-core machine, 17 s with a warm one
@pytest.mark.slow
@pytest.mark.skipif(bool(cpu_compiler_missing()), reason=f"torch.compile on the CPU needs {cpu_compiler_missing()}")
def test_fit_trains_a_step_with_the_encoder_compiled() -> None:
    torch._dynamo.reset()
    eager, eager_log = fit_one_step({}, depth=1)
    compiled, log = fit_one_step({"compile": True}, depth=1)
    assert compiled.encoder._compiled_call_impl is not None and eager.encoder._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the eager names
    assert log[0]["loss"] == pytest.approx(eager_log[0]["loss"], rel=1e-5)
    start = tiny_model(1, depth=1).state_dict()
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values(), strict=True):
        # one AdamW step moves each weight by about lr * sign(gradient): compiled and eager take the same step
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert any(not torch.equal(a, start[n]) for n, a in compiled.state_dict().items() if n.startswith("encoder."))


# bench/bench_train_step.py's rows are the GPU check's training-step numbers; bench/ is not in CI, so its models'
# build (ours and the authors' encoder behind the same model classes) is checked here, in a process with bench/ on
# its path
BUILD_BENCH_ROWS = """
import json, bench_train_step as b
print(json.dumps({"rows": list(b.ROWS), "built": [sorted(b.build_rows(b.small_case(s), "cpu")) for s in b.STAGES]}))
"""


def test_the_train_step_bench_builds_every_row() -> None:
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
    done = subprocess.run([sys.executable, "-c", BUILD_BENCH_ROWS], cwd=bench, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert len(out["built"]) == 2 and all(built == sorted(out["rows"]) for built in out["built"]), out
