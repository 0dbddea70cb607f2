"""From-scratch pretraining of a custom GPT (plain nn.Modules) under torchrun, resumable.

    torchrun --nproc-per-node 2 examples/own_loop/pretrain.py RUN_DIR \
        [--config examples/own_loop/pretrain.yaml] [key=value ...]

DDP on gloo (CPU) or NCCL, an OmegaConf config (stored in every checkpoint as JSON), a
StatefulDataLoader over a byte-token dataset. kill -9 every process at any moment and start
the same command again: the run continues bit-identically.
"""

import argparse
import gc
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from pydoc_data.topics import topics
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import evertrain
from common import EpochTracker, endless


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.heads, self.p = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, dropout
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(c.vocab_size, c.d_model), nn.Embedding(c.block_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_head, c.dropout) for _ in range(c.n_layer))
        self.ln, self.drop = nn.LayerNorm(c.d_model), nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied: stored under both names, loaded back tied
        for m in self.modules():  # GPT-2's init: small weights, so the first loss is ~ln(256)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())


def token_blocks(n_bytes: int, block: int) -> list[torch.Tensor]:
    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")[:n_bytes]
    ids = torch.tensor(list(data), dtype=torch.long)
    return [ids[i : i + block + 1] for i in range(0, len(ids) - block - 1, block)]


p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--config", default=str(Path(__file__).with_name("pretrain.yaml")))
p.add_argument("overrides", nargs="*")
args = p.parse_args()
cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
evertrain.seed_everything(cfg.seed)  # the same initial weights on every rank
model = GPT(cfg.model)
evertrain.seed_everything(cfg.seed + 1 + rank)  # each rank its own dropout masks
ddp = DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1)
t = cfg.train
warm_cos = lambda s: min((s + 1) / t.warmup, t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * s / t.steps)))  # noqa: E731
sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cos)
dataset = token_blocks(cfg.data.bytes, cfg.data.block_size)
sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=cfg.seed)
loader = StatefulDataLoader(dataset, batch_size=t.micro_batch, sampler=sampler, generator=torch.Generator())
tracker = EpochTracker()
ckpt = evertrain.Checkpointer(args.run_dir, model=ddp, optimizer=opt, scheduler=sched, data=loader,
                              extra={"tracker": tracker}, config=cfg, **cfg.checkpoint)
step = ckpt.resume()
batches = endless(loader, tracker, sampler)
with ckpt, ckpt.stop_on_signals():
    while step < t.steps and not ckpt.should_stop:
        loss_sum = torch.zeros(())
        for micro in range(t.accum):
            seq = next(batches)
            with ddp.no_sync() if micro < t.accum - 1 else torch.enable_grad():
                loss = ddp(seq[:, :-1], seq[:, 1:]) / t.accum
                loss.backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)  # the mean over ranks: logged, and tracked alike on every rank
        tracker.add(loss_sum.item() / world)
        step += 1
        ckpt.step(step, {"loss": loss_sum.item() / world, "lr": sched.get_last_lr()[0]}, save=step == t.steps)
if rank == 0:
    print(f"global_step {step} on {world} ranks, epochs done {tracker.epoch}, epoch losses {tracker.epoch_losses}")
# Tear the group down only when every rank is past its last collective, and after the
# DDP reducer (which holds the group) is gone: gloo work objects still alive at interpreter
# exit can abort the process with SIGABRT ("terminate called without an active exception").
dist.barrier()
del ckpt, ddp
gc.collect()
dist.destroy_process_group()
