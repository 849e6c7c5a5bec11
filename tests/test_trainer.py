"""The trainer: loss falls, NaN steps are skipped without touching weights, and resuming from a
snapshot (model, optimizer, schedule, step, carried stream state, ROSA replay) continues the same
run: N+M steps == N steps, resume, M steps."""

from __future__ import annotations

import copy
import random

import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.train.batches import TokenStreams
from hierarchos.train.schedule import lr_at
from hierarchos.train.trainer import TrainConfig, Trainer


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make(seed, epochs=2, **cfg_overrides):
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=32, **cfg_overrides))
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 8, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (6,), generator=g)]
    streams = TokenStreams.from_documents(docs, eos_id=31, batch_size=2, chunk=12)
    cfg = TrainConfig(epochs=epochs, batch_size=2, accumulation_steps=2, starting_lr=3e-3, min_lr=1e-4,
                      warmup_steps=2, log_every=1)
    return Trainer(model, streams, cfg, torch.device("cpu"), val_streams=streams, log=lambda *_: None)


def snapshot(trainer):
    return {"model": copy.deepcopy(trainer.model.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "schedule": trainer.schedule.state_dict(),
            "trainer": trainer.trainer_state(),
            "stream_state": {k: v.clone() for k, v in trainer.state_tensors().items()}}


def test_resume_equals_uninterrupted_run():
    seed = fresh_seed()
    straight = make(seed)
    straight.run()

    first = make(seed)
    saved = {}

    def on_checkpoint(t, is_best, reason):
        if t.opt_step == 3 and not saved:
            saved.update(snapshot(t))

    first.run(on_checkpoint=on_checkpoint, stop_requested=lambda: first.opt_step >= 3)
    assert saved, f"seed={seed}: no snapshot taken"

    resumed = make(seed)
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.schedule.load_state_dict(saved["schedule"])
    resumed.load_trainer_state(saved["trainer"])
    resumed.load_state_tensors(saved["stream_state"])
    resumed.run()
    assert resumed.opt_step == straight.opt_step
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed} {name}: {m}")


def test_loss_falls_and_validation_reports():
    seed = fresh_seed()
    trainer = make(seed, epochs=4)
    records = []
    trainer.log_metrics = records.append
    trainer.run()
    assert records[-1]["loss"] < records[0]["loss"], f"seed={seed}: {records}"
    assert "val_loss" in records[-1]


def test_non_finite_loss_skips_the_step_and_keeps_weights():
    seed = fresh_seed()
    trainer = make(seed, epochs=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():  # poison the output norm so every loss is NaN
        trainer.model.out_norm.weight.fill_(float("nan"))
    poisoned = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    logs = []
    trainer.log = logs.append
    trainer.run()
    assert trainer.skipped_steps == trainer.opt_step > 0
    assert any("skipped" in line for line in logs)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, poisoned[name]) or torch.isnan(value).all(), f"{name} changed"
    assert before.keys() == poisoned.keys()


def test_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 1.0, 0.1, 10) == 0.1
    assert lr_at(9, 100, 1.0, 0.1, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 0.1, 10) - 0.1) < 1e-12
    assert lr_at(50, 100, 1.0, 0.1, 10, disabled=True) == 1.0


def test_lazy_row_adam_matches_adam_on_touched_rows_and_freezes_the_rest():
    from hierarchos.train.schedule import LazyRowAdam

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(6, 3, generator=g)
    lazy_p = torch.nn.Parameter(table.clone())
    ref_p = torch.nn.Parameter(table.clone())
    lazy = LazyRowAdam([lazy_p], lr=0.1, betas=(0.9, 0.95))
    ref = torch.optim.Adam([ref_p], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        grad = torch.randn(6, 3, generator=g)
        grad[4:] = 0  # rows 4 and 5 never looked up
        lazy_p.grad, ref_p.grad = grad.clone(), grad.clone()
        lazy.step()
        ref.step()
    torch.testing.assert_close(lazy_p[:4], ref_p[:4], msg=lambda m: f"seed={seed}: {m}")
    assert torch.equal(lazy_p[4:].detach(), table[4:]), f"seed={seed}: untouched rows moved"


def test_deepembed_rows_no_batch_touched_stay_fixed():
    seed = fresh_seed()
    trainer = make(seed, epochs=1)
    table = trainer.model.reasoner.worker.deepembed[0].weight
    before = table.detach().clone()
    trainer.run(stop_requested=lambda: trainer.opt_step >= 3)
    seen = set(trainer.train_streams.streams[:, : 3 * 2 * trainer.train_streams.chunk + 1].flatten().tolist())
    unseen = [row for row in range(table.shape[0]) if row not in seen]
    assert unseen, "test data covers the whole vocabulary"
    assert torch.equal(table.detach()[unseen], before[unseen]), f"seed={seed}"
    assert not torch.equal(table.detach(), before), f"seed={seed}: no row moved at all"


def test_lazy_row_adam_row_update_equals_the_masked_reference():
    """The touched-rows update (the fast path) == the whole-table masked update, with rows touched
    intermittently (per-row bias correction) and for a 1-D table too."""
    from hierarchos.train.schedule import LazyRowAdam

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for shape in ((40, 5), (30,)):
        table = torch.randn(*shape, generator=g)
        fast_p, ref_p = torch.nn.Parameter(table.clone()), torch.nn.Parameter(table.clone())
        fast, ref = LazyRowAdam([fast_p], lr=0.05), LazyRowAdam([ref_p], lr=0.05, masked=True)
        for _ in range(5):
            grad = torch.randn(*shape, generator=g)
            grad[torch.rand(shape[0], generator=g) < 0.6] = 0
            fast_p.grad, ref_p.grad = grad.clone(), grad.clone()
            fast.step()
            ref.step()
        torch.testing.assert_close(fast_p, ref_p, rtol=1e-6, atol=1e-7, msg=lambda m: f"seed={seed} {shape}: {m}")
        for key in ("exp_avg", "exp_avg_sq", "row_steps"):
            torch.testing.assert_close(fast.state[fast_p][key], ref.state[ref_p][key], msg=key)


# ---- oracles: resume bookkeeping, validation ---------------------------------------------

def test_resume_restores_best_val_and_skipped_steps(tmp_path):
    """Through a real checkpoint (JSON on disk): a resumed run keeps the best validation loss so far
    (else its next epoch's worse loss would be saved as `best`) and the count of skipped steps."""
    from hierarchos import io as hio

    seed = fresh_seed()
    first = make(seed, epochs=1)
    first.best_val, first.skipped_steps = 0.0, 3  # 0.0: a falsy best must survive too
    hio.save_checkpoint(tmp_path, 1, first.model, first.optimizer, first.schedule, first.trainer_state())
    resumed = make(seed, epochs=1)
    resumed.load_trainer_state(hio.load_checkpoint(tmp_path, resumed.model, restore_rng=False))
    assert (resumed.best_val, resumed.skipped_steps) == (0.0, 3), f"seed={seed}"

    first.best_val = 2.5
    hio.save_checkpoint(tmp_path, 2, first.model, first.optimizer, first.schedule, first.trainer_state())
    resumed = make(seed, epochs=1)
    resumed.load_trainer_state(hio.load_checkpoint(tmp_path, resumed.model, restore_rng=False))
    assert resumed.best_val == 2.5, f"seed={seed}"
    saves = []
    resumed.last_metrics = {}
    resumed.log_metrics = lambda record: setattr(resumed, "last_metrics", {**record, "val_loss": 3.0})
    resumed.run(on_checkpoint=lambda t, is_best, reason: saves.append(is_best))
    assert saves and not any(saves), f"seed={seed}: a validation loss above the restored best was saved as best"


def held_out_text(seed: int) -> str:
    """Random text over an alphabet of 1-, 2-, 3- and 4-byte UTF-8 characters (so tokens != bytes)."""
    rng = random.Random(seed)
    return "".join(rng.choice("ab é€中😀\n") for _ in range(rng.randint(40, 70)))


def validation_run(seed: int):
    """A float64 trainer whose validation stream is `held_out_text` tokenized one id per character."""
    import numpy as np

    text = held_out_text(seed)
    alphabet = sorted(set("ab é€中😀\n"))
    ids = np.array([alphabet.index(ch) for ch in text], dtype=np.int64)
    trainer = make(seed, epochs=1)
    trainer.model.double()
    trainer.val_streams = TokenStreams.from_tokens(ids, 1, 12)  # several windows, the last one shorter
    trainer.val_bytes = len(text.encode("utf-8"))
    return trainer, ids, text


def hand_nll_sum(model, ids) -> float:
    """Summed next-token NLL (nats) of the whole stream in one parallel call from a fresh state."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids[None, :-1])).logits[0]
    model.train()
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1:]), reduction="sum").item()


def test_validation_carries_the_state_across_windows_of_one_stream():
    seed = fresh_seed()
    trainer, ids, _ = validation_run(seed)
    assert len(trainer.val_streams) >= 3, f"seed={seed}: the stream fits one window"
    metrics = trainer.evaluate()
    expected = hand_nll_sum(trainer.model, ids) / (len(ids) - 1)
    assert abs(metrics["val_loss"] - expected) <= 1e-9 * expected, f"seed={seed}: {metrics['val_loss']} vs {expected}"


def test_validation_without_persist_state_starts_every_window_afresh():
    """persist_state off (full attention, whose KV cache would grow through the whole held-out text):
    validation reads each window from a fresh state, as training does, and that differs from carrying."""
    seed = fresh_seed()
    trainer, ids, _ = validation_run(seed)
    carried = trainer.evaluate()["val_loss"]
    trainer.cfg.persist_state = False
    metrics = trainer.evaluate()
    nll, count = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for i in range(len(trainer.val_streams)):
            x, y = trainer.val_streams.batch(i)
            logits = trainer.model(x).logits
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     reduction="sum").item()
            count += y.numel()
    expected = nll / count
    assert abs(metrics["val_loss"] - expected) <= 1e-9 * expected, f"seed={seed}: {metrics['val_loss']} vs {expected}"
    assert abs(carried - expected) > 1e-6 * expected, f"seed={seed}: carrying the state changed nothing"


def test_validation_bits_per_byte_is_summed_nll_over_utf8_bytes():
    import math

    seed = fresh_seed()
    trainer, ids, text = validation_run(seed)
    assert len(text.encode("utf-8")) > len(text), f"seed={seed}: an ASCII-only text cannot tell bytes from tokens"
    metrics = trainer.evaluate()
    expected = hand_nll_sum(trainer.model, ids) / len(text.encode("utf-8")) / math.log(2)
    assert abs(metrics["val_bpb"] - expected) <= 1e-9 * expected, f"seed={seed}: {metrics['val_bpb']} vs {expected}"
