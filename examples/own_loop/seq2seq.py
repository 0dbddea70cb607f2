"""A plain seq2seq recipe loop (tiny T5) made exactly resumable by evertrain.Checkpointer.

    python examples/own_loop/seq2seq.py RUN_DIR [--steps 24] [--compile]

Kill it at any moment (kill -9 too) and run the same command again: it continues as if it
had never stopped (tests/test_own_loop_examples.py checks every tensor and every loss).
"""

import argparse

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler
from transformers import T5Config, T5ForConditionalGeneration, get_linear_schedule_with_warmup

import evertrain
from common import EpochTracker, endless, pc_examples, seq2seq_collate

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--steps", type=int, default=24)
p.add_argument("--compile", action="store_true")
args = p.parse_args()
cfg = {"seed": 0, "lr": 3e-3, "warmup": 4, "accum": 4, "micro_batch": 4, "steps": args.steps}

torch.set_num_threads(1)
evertrain.seed_everything(cfg["seed"])  # Python, NumPy and torch
train, val = evertrain.split_by_hash(pc_examples(), "prompt", val_fraction=0.2, seed=cfg["seed"])
model = T5ForConditionalGeneration(
    T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.1)
)
opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
sched = get_linear_schedule_with_warmup(opt, cfg["warmup"], cfg["steps"])
# own generators for the shuffle and the loader: neither may draw from the global RNG
sampler = RandomSampler(train, generator=torch.Generator().manual_seed(cfg["seed"]))
loader = StatefulDataLoader(train, batch_size=cfg["micro_batch"], sampler=sampler,
                            collate_fn=seq2seq_collate, generator=torch.Generator())
tracker = EpochTracker()
ckpt = evertrain.Checkpointer(args.run_dir, model=model, optimizer=opt, scheduler=sched,
                              data=loader, extra={"tracker": tracker}, config=cfg,
                              every_steps=5, keep_last=2)
step = ckpt.resume()
forward = torch.compile(model) if args.compile else model
batches = endless(loader, tracker)
with ckpt, ckpt.stop_on_signals():
    while step < cfg["steps"] and not ckpt.should_stop:
        loss_sum = 0.0
        for _ in range(cfg["accum"]):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(**next(batches)).loss / cfg["accum"]
            loss.backward()
            tracker.add(loss.item() * cfg["accum"])
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ckpt.step(step, {"loss": loss_sum, "lr": sched.get_last_lr()[0]},
                  save=step == cfg["steps"])
print(f"global_step {step}, epochs done {tracker.epoch}, epoch losses {tracker.epoch_losses}, "
      f"best {tracker.best_loss}")
