"""Time to a validation loss of 1.91: llmjax vs the PyTorch reference, side by side.

Command (repository root; the second is the reported setting, see benchmarks/README.md):
  .venv/bin/python -m benchmarks.nanogpt_cpu_race --target 1.91
  .venv/bin/python -m benchmarks.nanogpt_cpu_race --target 1.91 \
      --impls llmjax-bf16@devices=2@host_malloc=reuse_threads,torch-ref

nanoGPT's CPU configuration of shakespeare_char (its README: `--device=cpu --compile=False
--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`): 4 layers, 4 heads, 128 wide,
64 context, batch 12, AdamW lr 1e-3 (100 warmup steps, cosine to 1e-4 at 2000), betas
0.9/0.99, weight decay 0.1, clip 1.0, char-level `shakespeare` (vocab 65), the same
random-crop batches on both sides and, unless `--independent_init`, the same initial
weights (the PyTorch peers load llmjax's), so both follow one trajectory up to rounding and
the race measures speed rather than a lucky seed. The two train in alternating chunks of `--chunk`
steps (so machine drift hits both alike); every `--eval_every` steps both are evaluated
on the same `--eval_batches` validation batches. Time-to-target counts train-step time
only (evaluation excluded on both sides), up to the first evaluation at or under target.
"""

import argparse
import os

from benchmarks import common, train_vs_torch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", type=float, default=1.91)
  parser.add_argument("--max_iters", type=int, default=2000)
  parser.add_argument("--chunk", type=int, default=50)
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--eval_batches", type=int, default=20)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--shape", default="race")
  parser.add_argument("--independent_init", action="store_true",
                      help="each side draws its own initial weights (default: the PyTorch "
                      "peers start from llmjax's, so both follow the same trajectory)")
  parser.add_argument("--impls", default="llmjax,torch-ref",
                      help="as in train_vs_torch (options after @, e.g. llmjax-bf16@devices=2)")
  args = parser.parse_args()
  print(f"cpu: {common.cpu_info()}", flush=True)
  common.char_corpus(65)
  schedule = {"shape": args.shape, "lr": 1e-3, "warmup": 100, "total_steps": args.max_iters}
  workers = train_vs_torch.make_workers(args.impls, args.threads, **schedule)
  for w in workers:
    info = w.start()
    path = info.get("llmjax_file")
    print(f"{w.name}: {info['params']:,} params, initial loss {info['initial_loss']:.3f}, "
          f"first step {info['compile_s']:.1f}s"
          + (f", llmjax from {os.path.dirname(path)}" if path else ""), flush=True)
  source = next((w for w in workers if not w.is_torch), None)
  if source is not None and not args.independent_init:
    weights = source.call("gpt2_weights")
    for w in workers:
      if w.is_torch:
        loss = w.call("load_gpt2", weights)
        print(f"{w.name}: starts from {source.name}'s initial weights (loss {loss:.3f})",
              flush=True)
  state = {w.name: {"time": 0.0, "hit": None, "curve": []} for w in workers}
  try:
    for start in range(0, args.max_iters, args.chunk):
      active = [w for w in common.rotate(workers, start // args.chunk)
                if state[w.name]["hit"] is None]
      if not active:
        break
      n = min(args.chunk, args.max_iters - start)
      for w in active:
        times, _ = w.call("run", start, n)
        state[w.name]["time"] += sum(times)
      done = start + n
      if done % args.eval_every and done != args.max_iters:
        continue
      for w in active:
        loss = w.call("eval_split", "val", args.eval_batches)
        s = state[w.name]
        s["curve"].append((done, loss, s["time"]))
        if loss <= args.target:
          s["hit"] = (done, s["time"])
        print(f"step {done}: {w.name} val {loss:.4f} after {s['time']:.1f}s of training",
              flush=True)
  finally:
    for w in workers:
      w.stop()
  rows = []
  for name, s in state.items():
    it, sec = s["hit"] or ("-", "-")
    rows.append([name, it, f"{sec:.1f}" if s["hit"] else "not reached",
                 f"{s['curve'][-1][1]:.4f}", f"{s['time']:.1f}"])
  print(f"\nvalidation target {args.target}:")
  common.print_table(rows, ["impl", "iters to target", "train s to target", "last val loss",
                            "train s total"])
  ref = state.get("torch-ref", {}).get("hit")
  for name, s in state.items():
    if name != "torch-ref" and s["hit"] and ref:
      print(f"{name} / torch-ref time to target: {s['hit'][1] / ref[1]:.2f}x")


if __name__ == "__main__":
  main()
