"""Checkpoints: resume equals an uninterrupted run bit for bit on CPU; each checkpoint is a transformers model."""

import json

import pytest
import torch
import yaml

from diffllama.run_folder import list_checkpoints
from diffllama.train.loop import Trainer
from train_utils import MICRO_MODEL, micro_config, small_corpus


def _fit(cfg, out, *, stop_at=None, resume=False):
    trainer = Trainer(cfg, out, resume=resume, quiet=True)
    if stop_at is not None:
        def stop(t, metrics):
            if t.step == stop_at:
                t._stop_signal = "SIGTERM"  # what the SIGTERM handler sets
        trainer.callbacks.append(stop)
    return trainer, trainer.fit()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("document_mask", [False, True], ids=["", "document-mask"])
def test_resume_equals_uninterrupted(corpus, tmp_path, document_mask):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=6, save_every=3, eval_every=2,
                       document_mask=document_mask)
    _, full = _fit(cfg, tmp_path / "full")
    _, cut = _fit(cfg, tmp_path / "cut", stop_at=4)
    assert cut.interrupted == "SIGTERM" and cut.step == 4 and cut.checkpoint.name == "step-000004"
    assert not (tmp_path / "cut" / "model").exists()  # no final model for an interrupted run
    resumed_trainer, resumed = _fit(cfg, tmp_path / "cut", resume=True)
    assert resumed_trainer.resume_from.name == "step-000004" and resumed.step == 6
    a, b = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # bit for bit: losses, gradient norms, validation
        assert {k: v for k, v in ra.items() if k not in ("tokens_per_s", "elapsed_s")} == \
               {k: v for k, v in rb.items() if k not in ("tokens_per_s", "elapsed_s")}
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "full" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_signal_in_the_last_step_still_exports_the_final_model(corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=3, eval_every=3)
    _, result = _fit(cfg, tmp_path / "run", stop_at=3)
    assert result.interrupted is None and result.step == 3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_resume_finishes_a_run_whose_export_was_cut_short(corpus, tmp_path):
    """Killed after its last checkpoint but before model/ and summary.json: --resume writes them, no training."""
    import shutil

    cfg = micro_config(corpus, tmp_path / "cache", max_steps=3, eval_every=3)
    _, full = _fit(cfg, tmp_path / "run")
    want = json.loads((tmp_path / "run" / "summary.json").read_text())
    shutil.rmtree(tmp_path / "run" / "model")
    (tmp_path / "run" / "summary.json").unlink()
    steps_logged = len(_records(tmp_path / "run"))
    _, again = _fit(cfg, tmp_path / "run", resume=True)
    assert again.step == 3 and again.model_dir == tmp_path / "run" / "model"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    got = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert got == want and len(_records(tmp_path / "run")) == steps_logged
    _, third = _fit(cfg, tmp_path / "run", resume=True)  # now complete: nothing to do, no summary to print
    assert "summary" not in third.metrics


def test_checkpoint_is_a_transformers_model(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=4, save_every=1, keep_last=2)
    trainer, result = _fit(cfg, tmp_path / "run")
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-000003", "step-000004"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bits_per_byte"] > 0 and summary["unigram_entropy_bits_per_byte"] > 0
    for folder in (kept[-1], result.model_dir):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tok("Fellow-Citizens of the Senate", return_tensors="pt").input_ids
        assert ids.shape[1] > 2 and tok.decode(ids[0]) == "Fellow-Citizens of the Senate"
        with torch.no_grad():
            ours = trainer.model.cpu().eval()(ids).logits
            torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(cfg, tmp_path / "run", quiet=True)


def test_failure_before_first_checkpoint_leaves_nothing(corpus, tmp_path):
    cfg = micro_config(corpus, tmp_path / "cache", max_steps=4, save_every=0)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)

    def boom(t, metrics):
        raise RuntimeError("simulated crash")
    trainer.callbacks.append(boom)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_fit_is_a_clear_error(corpus, tmp_path, monkeypatch):
    from diffllama.train.loop import BatchTooLargeError

    cfg = micro_config(corpus, tmp_path / "cache", max_steps=2)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)

    def out_of_memory(step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(trainer, "train_step", out_of_memory)
    with pytest.raises(BatchTooLargeError, match="does not fit.*--batch-size"):
        trainer.fit()
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A 3-step micro run with its checkpoint (resume checks compare against its settings)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _fit(micro_config(corpus, out.parent / "cache", max_steps=3, save_every=3), out)
    return out


@pytest.mark.parametrize("changes, listed", [
    (dict(lr=0.1), "lr 0.003 in the checkpoint vs 0.1 now"),
    (dict(warmup_steps=5), "warmup_steps 2 in the checkpoint vs 5 now"),
    (dict(min_lr_ratio=0.5), "min_lr_ratio 0.1 in the checkpoint vs 0.5 now"),
    (dict(weight_decay=0.0), "weight_decay 0.1 in the checkpoint vs 0.0 now"),
    (dict(beta2=0.99), "beta2 0.95 in the checkpoint vs 0.99 now"),
    (dict(seq_len=16), "seq_len 32 in the checkpoint vs 16 now"),
    (dict(seed=7), "seed 1234 in the checkpoint vs 7 now"),
    (dict(batch_size=2), "batch_size 4 in the checkpoint vs 2 now"),
    (dict(grad_accum=2), "grad_accum 1 in the checkpoint vs 2 now"),
    (dict(val_fraction=0.2), "val_fraction 0.1 in the checkpoint vs 0.2 now"),
    (dict(model={**MICRO_MODEL, "rope_theta": 500.0}), "model.rope_theta None in the checkpoint vs 500.0 now"),
    (dict(model={**MICRO_MODEL, "hidden_size": 64}), "model.hidden_size 32 in the checkpoint vs 64 now"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_resume_refuses_settings_it_cannot_honour(corpus, finished_run, changes, listed):
    cfg = micro_config(corpus, finished_run.parent / "cache", max_steps=3, save_every=3, **changes)
    before = (finished_run / "config.yaml").read_text()
    with pytest.raises(ValueError) as caught:
        Trainer(cfg, finished_run, resume=True, quiet=True)
    message = str(caught.value)
    assert message.startswith(f"--resume: settings given now differ from those of the run's checkpoint "
                              f"{finished_run / 'checkpoints' / 'step-000003'} and a resumed run cannot honour them "
                              f"({listed}); "), message
    assert (finished_run / "config.yaml").read_text() == before


def test_resume_may_change_steering_settings_and_the_split_of_the_global_batch(corpus, finished_run):
    cfg = micro_config(corpus, finished_run.parent / "cache", max_steps=5, save_every=1, eval_every=1, log_every=2,
                       keep_last=1, grad_clip=0.5, num_threads=1, batch_size=2, grad_accum=2,
                       model={**MICRO_MODEL, "attn_implementation": "eager"})
    trainer = Trainer(cfg, finished_run, resume=True, quiet=True)
    assert trainer.step == 3 and trainer.plan.global_batch == 4


def test_resume_with_more_steps_follows_the_new_schedule(corpus, tmp_path):
    from diffllama.train.loop import lr_lambda

    cfg = micro_config(corpus, tmp_path / "cache", max_steps=6, save_every=3)
    _fit(cfg, tmp_path / "run", stop_at=4)
    longer = micro_config(corpus, tmp_path / "cache", max_steps=12, save_every=3)
    trainer, result = _fit(longer, tmp_path / "run", resume=True)
    # The cosine decay is recomputed to end at step 12: step 5 (index 4) runs at the new curve's lr, not the old.
    want = [3e-3 * lr_lambda(step, 2, 12, 0.1) for step in range(4, 12)]
    assert want[0] != pytest.approx(3e-3 * lr_lambda(4, 2, 6, 0.1))
    assert [r["lr"] for r in _records(tmp_path / "run") if r["step"] > 4 and "lr" in r] == want
    assert result.step == 12 and yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_steps"] == 12


def test_resume_refuses_a_changed_corpus_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = small_corpus(tmp_path / "corpus", documents=25)
    cfg = micro_config(path, tmp_path / "cache", data=["corpus/small.jsonl"], max_steps=2, save_every=2)
    _fit(cfg, tmp_path / "run")
    # stored absolute: the run reads the same file from any folder
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"] == [str(path)]
    original = path.read_bytes()
    path.write_bytes(original.replace(b"Fellow", b"Dear", 1))  # same line count, 2 bytes fewer
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    again = micro_config(path, tmp_path / "cache", max_steps=3, save_every=2)
    with pytest.raises(ValueError) as caught:
        Trainer(again, tmp_path / "run", resume=True, quiet=True)
    assert str(caught.value) == (
        f"--resume: the corpus changed since checkpoint {checkpoint} was written ({path} has "
        f"{len(original) - 2:,} bytes, {len(original):,} before); a resumed run must read the data it started with: "
        f"restore those files, or choose another --out to start a new run on the new data")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    path.write_bytes(original)
    monkeypatch.chdir(tmp_path / "corpus")  # the saved absolute path still names the file
    assert Trainer(again, tmp_path / "run", resume=True, quiet=True).step == 2


def test_checkpoint_without_a_corpus_record_still_resumes(tmp_path):
    """Checkpoints of versions before the record: resumed unchecked, as before."""
    path = small_corpus(tmp_path / "corpus", documents=25)
    cfg = micro_config(path, tmp_path / "cache", max_steps=2, save_every=2)
    _fit(cfg, tmp_path / "run")
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert [r["path"] for r in state["extra"].pop("data_files")] == [str(path)]
    torch.save(state, state_file)
    path.write_bytes(path.read_bytes().replace(b"Fellow", b"Dear", 1))
    assert Trainer(micro_config(path, tmp_path / "cache", max_steps=3), tmp_path / "run", resume=True,
                   quiet=True).step == 2
