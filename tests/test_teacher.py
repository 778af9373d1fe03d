"""EMA teacher (docs/method.md §8)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine, Events

from anatomask_components.teacher import EMATeacher, unwrap_model


class Tiny(nn.Module):
    """One parameter, one floating and one integer buffer, with exactly representable values."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("f", torch.tensor([0.0, 4.0]))
        self.register_buffer("n", torch.tensor(3))


def small_net(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 1, 1)).to(dtype)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_ema_arithmetic_by_hand():
    student = Tiny()
    ema = EMATeacher(student)
    with torch.no_grad():
        student.w.copy_(torch.tensor([3.0, -2.0]))
        student.f.copy_(torch.tensor([8.0, 4.0]))
        student.n.fill_(7)
    ema.update(0.75)
    assert torch.equal(ema.teacher.w, torch.tensor([1.5, 1.0]))  # 0.75 * [1, 2] + 0.25 * [3, -2]
    assert torch.equal(ema.teacher.f, torch.tensor([2.0, 4.0]))  # 0.75 * [0, 4] + 0.25 * [8, 4]
    assert ema.teacher.n.item() == 7 and ema.teacher.n.dtype == torch.int64  # integer buffer copied
    ema.update(0.5)
    assert torch.equal(ema.teacher.w, torch.tensor([2.25, -0.5]))


def test_ema_of_a_network_with_batchnorm_buffers():
    student = small_net()
    ema = EMATeacher(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(3):  # the student moves; BatchNorm running statistics and counter too
        opt.zero_grad()
        student(torch.randn(2, 1, 5, 5, 5, dtype=torch.float64)).square().mean().backward()
        opt.step()
    before_t, s = state(ema.teacher), state(student)
    assert not torch.equal(before_t["1.running_mean"], s["1.running_mean"])
    ema.update(0.9)
    after = state(ema.teacher)
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before_t[k] + 0.1 * s[k], rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(v, s[k])
    assert after["1.num_batches_tracked"].item() == 3


def test_teacher_starts_as_an_independent_copy_in_eval_mode_without_gradients():
    student = small_net().train()
    ema = EMATeacher(student)
    assert_same_state(ema.teacher, student)
    assert ema.teacher is not student
    assert not ema.teacher.training and student.training
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    x = torch.randn(2, 1, 5, 5, 5, dtype=torch.float64)
    student(x).sum().backward()
    assert all(p.grad is None for p in ema.teacher.parameters())
    assert not ema.teacher(x).requires_grad
    with torch.no_grad():  # no shared storage: changing the student leaves the teacher alone
        for p in student.parameters():
            p.add_(1.0)
    assert not torch.equal(ema.teacher[0].weight, student[0].weight)


def test_momentum_schedule():
    ema = EMATeacher(Tiny())
    assert ema.momentum(0, 100) == pytest.approx(0.999, abs=1e-12)
    assert ema.momentum(12.5, 100) == pytest.approx(0.99945, abs=1e-12)  # T / 8: half-way
    assert ema.momentum(25, 100) == pytest.approx(0.9999, abs=1e-12)  # T / 4: the end value
    assert ema.momentum(99, 100) == pytest.approx(0.9999, abs=1e-12)
    values = [ema.momentum(e, 100) for e in range(100)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        EMATeacher(Tiny(), momentum_start=1.5)


def _run(ema: EMATeacher, student: nn.Module, max_epochs: int, epoch_length: int):
    """Train the student with SGD in an ignite Engine; return the student states after each step."""
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    history, momenta = [], []

    def step(engine, _):
        student.train()
        opt.zero_grad()
        student(torch.randn(2, 1, 5, 5, 5, generator=gen, dtype=torch.float64)).square().mean().backward()
        opt.step()
        history.append(state(student))

    engine = Engine(step)
    ema.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(ema.last_momentum))
    engine.run(range(epoch_length), max_epochs=max_epochs)
    return history, momenta


@pytest.mark.parametrize("per_iteration", [False, True])
def test_engine_updates_after_every_iteration(per_iteration):
    student = small_net()
    initial = state(student)
    ema = EMATeacher(student, per_iteration=per_iteration)
    history, momenta = _run(ema, student, max_epochs=8, epoch_length=2)  # warm-up: 2 epochs
    assert len(history) == len(momenta) == 16
    if per_iteration:
        expected_m = [0.999 + 0.0009 * min((i / 2) / 2, 1.0) for i in range(16)]
    else:
        expected_m = [0.999 + 0.0009 * min((i // 2) / 2, 1.0) for i in range(16)]
    assert momenta == pytest.approx(expected_m, abs=1e-12)
    # the teacher is the hand-computed EMA of the student's successive states
    teacher = initial
    for m, s in zip(expected_m, history):
        teacher = {
            k: m * v + (1 - m) * s[k] if v.is_floating_point() else s[k].clone() for k, v in teacher.items()
        }
    for k, v in ema.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher[k], rtol=1e-10, atol=1e-12)
    assert not ema.teacher.training


def test_frozen_teacher_never_changes():
    student = small_net()
    initial = state(student)
    ema = EMATeacher(student, frozen=True)
    history, momenta = _run(ema, student, max_epochs=2, epoch_length=3)
    assert not torch.equal(history[-1]["0.weight"], initial["0.weight"])  # the student trained
    for k, v in ema.teacher.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert momenta == [1.0] * 6


def test_state_dict_round_trip():
    student = small_net(0)
    ema = EMATeacher(student)
    _run(ema, student, max_epochs=2, epoch_length=2)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMATeacher(small_net(1))  # a differently initialised student, as on resume
    assert not torch.equal(restored.teacher[0].weight, ema.teacher[0].weight)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(restored.teacher, ema.teacher)
    assert restored.last_momentum == ema.last_momentum == pytest.approx(0.9999)  # warm-up: 0.5 epoch
    # the restored teacher keeps following its own student
    restored.update(0.5)
    assert not torch.equal(restored.teacher[0].weight, ema.teacher[0].weight)


def test_data_parallel_is_unwrapped():
    student = small_net()
    wrapped = nn.DataParallel(student)
    assert unwrap_model(nn.DataParallel(wrapped)) is student
    assert unwrap_model(student) is student
    ema = EMATeacher(wrapped)
    assert ema.student is student
    assert not isinstance(ema.teacher, nn.DataParallel)
    assert ema.teacher.state_dict().keys() == student.state_dict().keys()
    before = ema.teacher[0].weight.clone()
    with torch.no_grad():
        wrapped.module[0].weight.add_(2.0)
    ema.update(0.5)
    torch.testing.assert_close(ema.teacher[0].weight, before + 1.0)


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        student = small_net(dtype=torch.float32)
        ema = EMATeacher(nn.parallel.DistributedDataParallel(student))
        assert ema.student is student
        assert ema.teacher.state_dict().keys() == student.state_dict().keys()
    finally:
        dist.destroy_process_group()


def test_teacher_of_a_sparse_spconv_student():
    pytest.importorskip("spconv.pytorch")
    from anatomask_components.masking import random_patch_mask
    from anatomask_components.networks import AnatoMaskPretrainModel, STUNet

    torch.manual_seed(0)
    backbone = STUNet(1, 1, depths=(1,) * 6, dims=(8, 16, 32, 32, 32, 32))
    student = AnatoMaskPretrainModel(backbone, backend="spconv")
    ema = EMATeacher(student)
    assert ema.teacher.sparse_encoder.backend == "spconv"
    x = torch.randn(1, 1, 32, 32, 32)
    mask = random_patch_mask(1, 8, 0.5, generator=torch.Generator().manual_seed(0))
    student.eval()
    with torch.no_grad():
        assert torch.equal(ema.teacher(x, mask), student(x, mask))
