"""Alignment from one SFT checkpoint: a reward model, then DPO, PPO and GRPO, each scored
on held-out prompts by the reward model and a verifiable reward, with its KL to the SFT
model and samples.

Command (from the repository root, after `bash scripts/setup_env.sh`):
  .venv/bin/python experiments/alignment.py --pretrained workdirs/shakespeare \
      --out workdirs/alignment

Stages (each an ordinary `llmjax train` run through `llmjax.train.main.run`, skipped when
its workdir already has a checkpoint, so a stopped study resumes):
  pre-train  `--pretrained`: the main job's run (runs/shakespeare_small.gin: 4 x 256 GPT,
             2048-piece BPE, 128 tokens), trained first if missing
  SFT        runs/sft.gin on shakespeare_instruct from it (`--sft_steps`)
  reward     runs/reward_model.gin on shakespeare_preferences from SFT (`--rm_steps`)
  DPO        runs/dpo.gin from SFT, the reference its frozen copy (`--dpo_steps`); and,
             with `--dpo_rpo`, the same with DPO.rpo_alpha (an NLL term on the chosen
             response: the remedy tried for the chosen log-probs' fall)
  PPO        runs/ppo.gin from SFT, reward = the trained reward model (reward='model')
  GRPO       runs/grpo.gin from SFT, reward = 'syllables' (verifiable: −|syllables of
             the first line − 10|) or the reward model (`--grpo_reward model`)
PPO and GRPO: `--rl_steps` steps at `--rl_lr`, prompts the first 32 tokens of training
scenes, 64 new tokens.

Scores (`evaluate`): the reward model's accuracy on the test split's pairs, by the kind
of rejected line (another scene's, or the true line shuffled); DPO's implicit-reward
accuracy on the validation pairs (the run's last eval). For the SFT model and every
policy, on `--prompts` held-out prompts (the first 32 tokens of validation scenes):
the reward model's score and the syllables reward of the greedy continuation (up to 64
tokens or EOS), their means over `--samples` sampled continuations (temperature 1) per
prompt, and KL(π ‖ π_SFT) = E_{y~π}[log π(y|x) − log π_SFT(y|x)], the sequence KL
estimated on those samples (nats per completion; 0 for SFT itself); and three prompts'
greedy lines.

Result (session 2026-12-07; 2-core Intel Xeon CPU, no accelerator; defaults above; the
stages ran one after another, niced, beside other jobs and test runs, so the train
seconds are only indicative). Starting point: the main job's run (4 x 256, 3.72M
parameters, 500 steps), SFT 300 steps (eval loss 2.844 at step 300).

Reward model (300 steps): 78.5% of 400 test pairs, 90.0% where the rejected line is the
true one shuffled (target >= 85%: met), 66.0% where it is another scene's line.

DPO (300 steps, β 0.1; implicit-reward accuracy on the validation pairs, 16 batches):

| run | accuracy at 50 / 150 / 300 | margin at 300 | log p chosen at 50 / 300 (SFT: -73.14) | log p rejected at 300 |
|---|---|---|---|---|
| DPO | 78.2 / 80.9 / 81.3% (target >= 80%: met) | +0.997 | -76.46 / -81.15 | -99.48 |
| DPO + RPO (α 1) | 78.2 / 77.8 / 80.9% | +0.464 | -72.47 / -71.30 | -84.30 |

DPO lowers the chosen responses' own log-probability by 8 nats while it separates the
pairs (the known complaint); RPO's NLL term keeps it at the SFT model's level (-71.3 vs
-73.1) at the same held-out accuracy, with half the margin.

Policies on 64 held-out prompts (RM: the reward model's score; syllables: −|syllables −
10| of the first line; KL: nats per sampled completion, 4 samples per prompt):

| policy | RM (greedy) | RM (sampled) | syllables (greedy) | syllables (sampled) | KL to SFT | greedy tokens | train s |
|---|---|---|---|---|---|---|---|
| SFT | -0.188 | -0.052 | -9.17 | -8.66 | 0.00 | 2.4 | 133 |
| DPO | +0.007 | +0.021 | -8.77 | -8.25 | 1.26 | 2.8 | 406 |
| DPO + RPO | -0.212 | -0.026 | -8.40 | -7.67 | 1.23 | 3.8 | 297 |
| PPO (reward: RM) | +1.800 | +1.791 | -9.89 | -9.69 | 17.40 | 5.2 | 425 |
| GRPO (reward: syllables) | -0.350 | -0.253 | -3.03 | -2.13 | 15.50 | 11.6 | 276 |
| PPO, β 0.2 (adaptive, horizon 1000) | +0.435 | +0.437 | -9.71 | -9.19 | 2.82 | 1.9 | 360 |
| GRPO, β 0.2 | -0.507 | -0.408 | -6.54 | -4.84 | 5.31 | 6.6 | 511 |

Greedy lines of three held-out prompts (SFT / PPO / GRPO / PPO β 0.2 / GRPO β 0.2):
  "...Enter QUINCE, SNUG, BOT"            '' / '**  \nWhat!' / 'BELATIOSTONGELATIO' / '\n' / '  POL'
  "...Enter TITANIA, with her train_ **TIT" 'IUS' / '**  \nWhat.' / 'ours of Errus and
                                          Camus and Cle' / 'IUS' / 'IUS and Cleopatra'
  "...Enter ORLANDO, with a paper_ **ORLANDO**" 'O' / 'What.' / 'OCTAVIUSmen of Ends
                                          Labours of Ends' / 'Come!' / 'O, Part 2'

What it says. Both RL methods raise their own reward far above the SFT model's: PPO the
reward model's score from -0.19 to +1.80, GRPO the syllable reward from -9.2 to -3.0
(greedy). At the default KL weights (PPO β 0.05 with Ziegler's horizon of 10,000
samples, which cannot adapt within 100 steps of 32; GRPO β 0.04) both drift 15-17 nats
from the SFT model and HACK their rewards: PPO collapses onto a stock line ("What."),
which the reward model, trained only to tell true next lines from shuffled or misplaced
ones, scores high; GRPO writes invented many-vowelled words ("BELATIOSTONGELATIO") that
the vowel-group syllable count takes for ten syllables. A stronger pull to the SFT model
stops it: at β 0.2, PPO keeps a gain of +0.62 in RM score at 2.8 nats and GRPO +2.6
syllable points at 5.3 nats, and their lines are the SFT model's kind again ("IUS and
Cleopatra", "Come!"). DPO and RPO barely move these two rewards (neither optimizes
them; KL 1.2-1.3). The SFT model (a 3.7M model fine-tuned on question answering) ends
its continuations after 2-4 tokens, so the completions are short throughout.

Separate critic (session 2026-12-07 15:00; same machine, nothing else running):
  .venv/bin/python experiments/alignment.py --pretrained workdirs/shakespeare \
      --out workdirs/alignment --stages sft,reward,ppo_kl,ppo_critic
The main job's model, SFT and reward model were all retrained in this session (new
checkpoints: the reward model scores on another scale, 77.5% of the test pairs, 89.5%
on shuffled ones, 64.4% on other scenes' lines), so compare these rows with each other,
not with the table above. Both PPO runs are `ppo_kl`'s (β from 0.2, adaptive, horizon
1000, 100 steps of 32 prompts), one with `PPO.critic='separate'` (a second 3.7M trunk
copied from SFT, the value loss training it alone):

| policy | RM (greedy) | RM (sampled) | KL to SFT | value loss at step 100 | mean V at 100 | train s |
|---|---|---|---|---|---|---|
| SFT | -0.941 | -0.883 | 0.00 | - | - | 222 |
| PPO, shared trunk | -0.569 | -0.532 | 1.83 | 0.051 | -0.596 | 369 |
| PPO, separate critic | -0.473 | -0.470 | 2.08 | 0.018 | -0.477 | 593 |

The separate critic fits the returns better (value loss 0.018 vs 0.051 at the end; the
training reward -0.391 vs -0.438 at step 100) and gains a little more reward-model score
(+0.47 vs +0.37 greedy) at a little more KL (2.08 vs 1.83 nats), for 1.6x the train
time (a second forward and backward pass and twice the optimizer state). Greedy lines
stay short and of the SFT model's kind for both ("IUS", "FALSTAFF").
"""

import argparse
import json
import os
import time

import numpy as np

PROMPT_LEN, NEW_TOKENS = 32, 64
DPO_BETA = 0.1  # runs/dpo.gin's
POLICIES = ("sft", "dpo", "dpo_rpo", "ppo", "grpo", "ppo_kl", "grpo_kl", "ppo_critic")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--pretrained", default="workdirs/shakespeare")
  p.add_argument("--out", required=True, help="one workdir per stage goes here")
  p.add_argument("--sft_steps", type=int, default=300)
  p.add_argument("--rm_steps", type=int, default=300)
  p.add_argument("--dpo_steps", type=int, default=300)
  p.add_argument("--dpo_rpo", type=float, default=1.0, help="0: no RPO run")
  p.add_argument("--rl_steps", type=int, default=100)
  p.add_argument("--rl_lr", type=float, default=1e-4)
  p.add_argument("--grpo_reward", default="syllables", choices=("syllables", "model"))
  p.add_argument("--strong_kl", type=float, default=0.2, help="β of the *_kl runs")
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--samples", type=int, default=4)
  p.add_argument("--stages", default="sft,reward,dpo,ppo,grpo,ppo_kl,grpo_kl,ppo_critic")
  p.add_argument("--data_dir", default=None)
  return p.parse_args()


def _trained(workdir) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints")) and bool(
      os.listdir(os.path.join(workdir, "checkpoints")))


def train(name, gin_files, bindings, workdir, data_dir, log):
  """One stage's run (skipped when it has a checkpoint); returns its wall seconds."""
  from llmjax.train import main
  if _trained(workdir):
    return None
  bindings = list(bindings) + ["TrainConfig.progress_bar = False"]
  if data_dir:
    bindings.append(f"DataConfig.data_dir = {data_dir!r}")
  start = time.time()
  main.run(gin_files, bindings, workdir)
  seconds = time.time() - start
  log(f"{name}: trained in {seconds:.0f} s -> {workdir}")
  return seconds


def stages(args, log=print) -> dict:
  """Trains every stage of `args.stages`; returns {stage: workdir}."""
  out = os.path.abspath(args.out)
  pre = os.path.abspath(args.pretrained)
  train("pre-train", ["runs/shakespeare_small.gin"], [], pre, args.data_dir, log)
  dirs = {name: os.path.join(out, name) for name in POLICIES[1:] + ("sft", "reward")}
  wanted = args.stages.split(",")
  init = lambda src: f"TrainConfig.init_from = {src!r}"
  seconds = {}
  if "sft" in wanted:
    seconds["sft"] = train("SFT", ["runs/sft.gin"],
                           [init(pre), f"TrainConfig.num_steps = {args.sft_steps}"],
                           dirs["sft"], args.data_dir, log)
  if "reward" in wanted:
    seconds["reward"] = train("reward model", ["runs/reward_model.gin"],
                              [init(dirs["sft"]), f"TrainConfig.num_steps = {args.rm_steps}",
                               "TrainConfig.eval_batches = 16"],
                              dirs["reward"], args.data_dir, log)
  if "dpo" in wanted:
    dpo = [init(dirs["sft"]), f"TrainConfig.num_steps = {args.dpo_steps}",
           f"TrainConfig.eval_every = {max(args.dpo_steps // 6, 1)}",
           "TrainConfig.eval_batches = 16"]
    seconds["dpo"] = train("DPO", ["runs/dpo.gin"], dpo, dirs["dpo"], args.data_dir, log)
    if args.dpo_rpo:
      seconds["dpo_rpo"] = train("DPO + RPO", ["runs/dpo.gin"],
                                 dpo + [f"DPO.rpo_alpha = {args.dpo_rpo}"], dirs["dpo_rpo"],
                                 args.data_dir, log)
  rl = [init(dirs["sft"]), f"TrainConfig.num_steps = {args.rl_steps}",
        f"OptimizerConfig.peak_lr = {args.rl_lr}", "TrainConfig.eval_every = 1000000",
        f"TrainConfig.checkpoint_every = {args.rl_steps}"]
  if "ppo" in wanted:
    seconds["ppo"] = train("PPO", ["runs/ppo.gin"], rl + [
        "PPO.reward = 'model'", "PPO.reward_kwargs = {}",
        f"PPO.reward_model = {dirs['reward']!r}"], dirs["ppo"], args.data_dir, log)
  reward = (["GRPO.reward = 'model'", "GRPO.reward_kwargs = {}",
             f"GRPO.reward_model = {dirs['reward']!r}"] if args.grpo_reward == "model" else [])
  if "grpo" in wanted:
    seconds["grpo"] = train("GRPO", ["runs/grpo.gin"], rl + reward, dirs["grpo"],
                            args.data_dir, log)
  # The same with a stronger pull to the SFT model (what stops the reward hacking seen
  # at the default KL weights): PPO's β from 0.2, adapting towards 6 nats over a
  # horizon short enough to act within the run; GRPO's β 0.2.
  ppo_kl = rl + ["PPO.reward = 'model'", "PPO.reward_kwargs = {}",
                  f"PPO.reward_model = {dirs['reward']!r}", f"PPO.kl_coef = {args.strong_kl}",
                  "PPO.kl_horizon = 1000"]
  if "ppo_kl" in wanted:
    seconds["ppo_kl"] = train("PPO, strong KL", ["runs/ppo.gin"], ppo_kl, dirs["ppo_kl"],
                              args.data_dir, log)
  if "ppo_critic" in wanted:  # the same, its value model a separate copy of SFT
    seconds["ppo_critic"] = train("PPO, strong KL, separate critic", ["runs/ppo.gin"],
                                  ppo_kl + ["PPO.critic = 'separate'"], dirs["ppo_critic"],
                                  args.data_dir, log)
  if "grpo_kl" in wanted:
    seconds["grpo_kl"] = train("GRPO, strong KL", ["runs/grpo.gin"],
                               rl + reward + [f"GRPO.beta = {args.strong_kl}"],
                               dirs["grpo_kl"], args.data_dir, log)
  return {"pretrained": pre, **dirs}, seconds


# --- scores -----------------------------------------------------------------------------

def reward_model_accuracy(reward_dir, data_dir, limit=400) -> dict:
  """The reward model's accuracy on the test split's pairs, overall and by kind."""
  from llmjax.checkpoint.workdir import load_workdir
  from llmjax.data import datasets
  from llmjax.objectives.reward import RewardModel
  model, params, tok = load_workdir(reward_dir)
  source = datasets.get_source("shakespeare_preferences", "test", data_dir)
  records = [source[i] for i in range(min(limit, len(source)))]
  scorer = RewardModel(max_len=128)
  score = lambda side: np.concatenate([
      scorer.score(model, params, tok, [(r["prompt"], r[side]) for r in records[i:i + 64]])
      for i in range(0, len(records), 64)])
  correct = score("chosen") > score("rejected")
  kinds = np.asarray([r["kind"] for r in records])
  return {"all": float(correct.mean()), "pairs": len(records),
          **{str(k): float(correct[kinds == k].mean()) for k in sorted(set(kinds))}}


def held_out_prompts(tok, data_dir, count) -> np.ndarray:
  """`[count, 32]` token ids: [bos] + the first tokens of validation scenes."""
  from llmjax.data import datasets
  rows = []
  for text in datasets.iter_texts("shakespeare", "validation", data_dir=data_dir):
    ids = [tok.bos_id] + tok.encode(text)
    if len(ids) >= PROMPT_LEN:
      rows.append(ids[:PROMPT_LEN])
    if len(rows) == count:
      break
  return np.asarray(rows, np.int32)


class Scorer:
  """Rewards (the reward model and syllables) and the KL to the SFT model, jitted."""

  def __init__(self, dirs, tok):
    import jax

    from llmjax.checkpoint.workdir import load_workdir
    from llmjax.objectives.grpo import GRPO
    from llmjax.train import warm_start
    self.tok = tok
    self.model, self.sft_params, _ = load_workdir(dirs["sft"])
    self.by_model = GRPO(prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, reward="model",
                         reward_model=dirs["reward"])
    self.by_model.bind_reward_model(warm_start.load(dirs["reward"]).model_config)
    self.rm_params = load_workdir(dirs["reward"])[1]
    self.syllables = GRPO(prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS,
                          reward="syllables", reward_kwargs={"target": 10})
    self.syllables.bind_tokenizer(tok)
    self._score = jax.jit(self._score_fn)
    self._sample = jax.jit(self._sample_fn)

  def _score_fn(self, rm_params, prompts, tokens, mask):
    model = self.by_model.rewards(self.model, {"reward_model": rm_params}, prompts, tokens,
                                  mask)
    syll = self.syllables.rewards(self.model, None, prompts, tokens, mask)
    return model, syll

  def _sample_fn(self, params, sft_params, prompts, rng):
    from llmjax.objectives import rollout
    tokens, mask, logp = rollout.rollout(self.model, params, prompts, rng,
                                         max_new_tokens=NEW_TOKENS, eos_id=self.tok.eos_id)
    ref = rollout.completion_logps(self.model, sft_params, prompts, tokens, mask)
    return tokens, mask, (logp - ref).sum(axis=1)

  def greedy(self, params, prompts):
    """`(tokens [B, 64], mask [B, 64])` of greedy continuations (up to EOS)."""
    from llmjax.decode.generate import generate
    from llmjax.decode.sampling import SamplingConfig
    out = generate(self.model, params, [list(p) for p in prompts], max_new_tokens=NEW_TOKENS,
                   sampling=SamplingConfig(temperature=0.0), eos_id=self.tok.eos_id)
    tokens = np.zeros((len(prompts), NEW_TOKENS), np.int32)
    mask = np.zeros((len(prompts), NEW_TOKENS), bool)
    for i, row in enumerate(out.rows()):
      tokens[i, :len(row)], mask[i, :len(row)] = row, True
    return tokens, mask

  def policy(self, params, prompts, samples, seed=0) -> dict:
    import jax
    tokens, mask = self.greedy(params, prompts)
    model, syll = self._score(self.rm_params, prompts, tokens, mask)
    rows = np.repeat(prompts, samples, axis=0)
    s_tokens, s_mask, kl = self._sample(params, self.sft_params, rows, jax.random.key(seed))
    s_model, s_syll = self._score(self.rm_params, rows, s_tokens, s_mask)
    texts = [self.tok.decode([int(t) for t in row[m]]) for row, m in zip(tokens[:3], mask[:3])]
    return {"greedy_rm": float(np.mean(model)), "greedy_syllables": float(np.mean(syll)),
            "sampled_rm": float(np.mean(s_model)), "sampled_syllables": float(np.mean(s_syll)),
            "kl": float(np.mean(kl)), "greedy_length": float(mask.sum(1).mean()),
            "samples": texts}


def _last_eval(workdir) -> dict:
  from llmjax.train.metrics import read_metrics
  evals = [r for r in read_metrics(workdir) if any(k.startswith("eval_") for k in r)]
  return evals[-1] if evals else {}


def evaluate(args, dirs, log=print) -> dict:
  from llmjax.checkpoint.workdir import load_workdir
  from llmjax.train.metrics import read_metrics
  results = {"reward_model": reward_model_accuracy(dirs["reward"], args.data_dir)}
  log(f"reward model, test pairs: {results['reward_model']}")
  for name in ("dpo", "dpo_rpo"):
    if _trained(dirs[name]):
      history = [{k: r[k] for k in ("step", "eval_reward_accuracy", "eval_reward_margin",
                                    "eval_logps_chosen", "eval_logps_rejected",
                                    "eval_rewards_chosen") if k in r}
                 for r in read_metrics(dirs[name]) if "eval_reward_accuracy" in r]
      results[name + "_eval"] = history
      log(f"{name} validation pairs: {history[-1]}")
  _, _, tok = load_workdir(dirs["sft"])
  scorer = Scorer(dirs, tok)
  prompts = held_out_prompts(tok, args.data_dir, args.prompts)
  results["prompts"] = [tok.decode([int(t) for t in p[1:]]) for p in prompts[:3]]
  for name in POLICIES:
    if _trained(dirs[name]):
      params = scorer.sft_params if name == "sft" else load_workdir(dirs[name])[1]
      results[name] = scorer.policy(params, prompts, args.samples)
      log(name, {k: v for k, v in results[name].items() if k != "samples"})
  return results


def print_tables(results, seconds):
  rm = results["reward_model"]
  print(f"reward model, {rm['pairs']} test pairs: accuracy {100 * rm['all']:.1f}% "
        f"(other_scene {100 * rm.get('other_scene', float('nan')):.1f}%, shuffled "
        f"{100 * rm.get('shuffled', float('nan')):.1f}%)")
  for name in ("dpo", "dpo_rpo"):
    rows = results.get(name + "_eval", [])
    if rows:  # the implicit reward is β (log π − log π_SFT): the SFT's own log p back
      sft = rows[0]["eval_logps_chosen"] - rows[0]["eval_rewards_chosen"] / DPO_BETA
      print(f"{name}: the SFT model's log p of the chosen responses, same pairs: {sft:.2f}")
    for row in rows:
      print(f"{name} step {row['step']}: validation implicit-reward accuracy "
            f"{100 * row['eval_reward_accuracy']:.1f}%, margin {row['eval_reward_margin']:+.3f}, "
            f"log p chosen {row['eval_logps_chosen']:.2f}, rejected {row['eval_logps_rejected']:.2f}")
  print("| policy | RM score (greedy) | RM score (sampled) | syllables (greedy) | "
        "syllables (sampled) | KL to SFT (nats) | greedy length | train s |")
  print("|---|---|---|---|---|---|---|---|")
  for name in POLICIES:
    if name in results:
      r = results[name]
      sec = seconds.get(name)
      print(f"| {name} | {r['greedy_rm']:+.3f} | {r['sampled_rm']:+.3f} | "
            f"{r['greedy_syllables']:+.2f} | {r['sampled_syllables']:+.2f} | {r['kl']:.2f} | "
            f"{r['greedy_length']:.1f} | {'-' if sec is None else f'{sec:.0f}'} |")
  for i, prompt in enumerate(results["prompts"]):
    print(f"--- prompt {i}: ...{prompt[-100:]!r}")
    for name in POLICIES:
      if name in results:
        print(f"  {name:8s} {results[name]['samples'][i][:160]!r}")


def main_(args):
  dirs, seconds = stages(args)
  results = evaluate(args, dirs)
  print_tables(results, seconds)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"results": results, "seconds": seconds}, f, indent=1)
  return results


if __name__ == "__main__":
  main_(parse_args())
