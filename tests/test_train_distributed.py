"""Two gloo processes on CPU (DDP, FSDP2) give the losses of one process with the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from diffllama.train.loop import Trainer
from train_utils import micro_config, small_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg, out, result_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, out, quiet=True)
    trainer.fit()
    if rank == 0:
        with open(result_file, "w") as handle:
            json.dump(trainer.history, handle)
    torch.distributed.destroy_process_group()


def _single(cfg, out):
    trainer = Trainer(cfg, out, quiet=True)
    trainer.fit()
    return trainer.history


@pytest.mark.parametrize("parallel, document_mask", [("ddp", False), ("fsdp", False), ("fsdp", True)],
                         ids=["ddp", "fsdp", "fsdp-document-mask"])
def test_two_processes_match_one(parallel, document_mask, tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    common = dict(max_steps=4, eval_every=2, save_every=2, grad_accum=2, document_mask=document_mask)
    single = _single(micro_config(corpus, tmp_path / "cache", batch_size=4, parallel="none", **common),
                     tmp_path / "single")
    cfg = micro_config(corpus, tmp_path / "cache", batch_size=2, parallel=parallel, **common)
    result_file = tmp_path / "ranks.json"
    mp.spawn(_worker, args=(2, _free_port(), cfg, tmp_path / "multi", str(result_file)), nprocs=2, join=True)
    multi = json.loads(result_file.read_text())
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for a, b in zip(single, multi):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (key, a["step"])
    # The multi-process run's checkpoint holds the same (full, unsharded) weights as the single one, closely.
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "single" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "multi" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
