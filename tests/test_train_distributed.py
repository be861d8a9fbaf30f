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


@pytest.mark.slow  # a subprocess or several: the README's test command keeps under 3 minutes
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


def test_fsdp2_mixed_precision_keeps_rope_frequencies_float32(tmp_path):
    """FSDP2 with bfloat16 parameters for compute (one gloo process): the rotary buffers are not parameters, so
    fully_shard moves them without a cast; the cos/sin the model uses are float32 angles rounded to bfloat16."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
    from diffllama.rope import RotaryEmbedding
    from diffllama.train.distributed import DistInfo, parallelize

    config = DiffLlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=64,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DiffLlamaForCausalLM(config)
        parallelize(model, model.model.layers, mode="fsdp", info=DistInfo(), mixed_precision=torch.bfloat16)
        assert isinstance(model, FSDPModule)
        seen = []
        model.model.rotary_emb.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out)))
        pos = torch.tensor([[0, 1000, 30000, 32767]])
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), position_ids=pos)
    finally:
        dist.destroy_process_group()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    (activation_dtype, (cos, sin)), = seen
    assert activation_dtype == cos.dtype == torch.bfloat16  # the computation really ran in bfloat16
    expected = RotaryEmbedding(config)(torch.zeros(1, dtype=torch.bfloat16), pos)
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
