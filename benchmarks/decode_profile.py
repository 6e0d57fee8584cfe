"""Where a decoding step's time goes, and how its cost grows with the batch (issue 7: profile missed targets).

    python benchmarks/decode_profile.py [--model smollm2-135m] [--batches 8,16,32,64] [--steps 20] [--threads 0]
    python benchmarks/decode_profile.py --caches [--steps 32]

1. For each batch size: one prefill, then `--steps` greedy decoding steps (evaluate/generate.greedy_decode, no
   end tokens, so every row runs every step) of short chat prompts; prints ms per step and new tokens/s.
   If the step cost grew with the rows, tokens/s would stay flat; if it is fixed (reading the weights), it grows
   with the batch.
2. torch.profiler over a prefill and `--steps` steps at the first batch size: the top operators by self CPU time.
With --caches instead: greedy_decode on 64 of the evaluation's attack prompts (200-450 tokens) for `--steps`
steps, alternately with transformers' DynamicCache and with the preallocated cache it uses, three times each;
prints the times, their median ratio and whether the tokens are the same.
Run it on an idle machine; nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", default="8,16,32,64")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--caches", action="store_true", help="time DynamicCache against the preallocated cache")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch.profiler import ProfilerActivity, profile

    from nestune.evaluate.generate import greedy_decode, render
    from nestune.models import load_model

    loaded = load_model(args.model, "cpu", "fp32")
    model, tok = loaded.model, loaded.tokenizer
    tok.padding_side = "left"
    if args.caches:
        compare_caches(model, tok, args.steps)
        return
    batches = [int(b) for b in args.batches.split(",")]

    def encode(n):
        texts = [f"Question {i}: how do I bake bread number {i}?" for i in range(n)]
        return tok(render(tok, texts, None), padding=True, return_tensors="pt", add_special_tokens=False)

    print(f"{args.model}: {torch.get_num_threads()} threads, {args.steps} decoding steps after one prefill")
    for n in batches:
        enc = encode(n)
        greedy_decode(model, enc["input_ids"], enc["attention_mask"], 2, [])  # warm-up
        start = time.perf_counter()
        greedy_decode(model, enc["input_ids"], enc["attention_mask"], 1, [])
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        greedy_decode(model, enc["input_ids"], enc["attention_mask"], args.steps + 1, [])
        step = (time.perf_counter() - start - prefill) / args.steps
        print(f"batch {n:3d}: prompt {enc['input_ids'].shape[1]} tokens, prefill {prefill:.2f} s, "
              f"decoding step {1000 * step:.0f} ms, {n / step:.0f} new tokens/s", flush=True)

    enc = encode(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy_decode(model, enc["input_ids"], enc["attention_mask"], args.steps + 1, [])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def compare_caches(model, tok, steps: int) -> None:
    import statistics

    from transformers import DynamicCache

    from nestune import data
    from nestune.evaluate import generate
    from nestune.evaluate.attacks import build_prompt, resolve_attacks, templates_from_prompts

    attacks = resolve_attacks("default", templates_from_prompts(data.load("jailbreak-templates")))
    behaviours = data.pick("advbench", "heldout", 8, 0)
    texts = [build_prompt(a, b)[0] for a in attacks for b in behaviours][:64]
    enc = tok(generate.render(tok, texts, None), padding=True, return_tensors="pt", add_special_tokens=False)
    print(f"batch {tuple(enc['input_ids'].shape)}, {int(enc['attention_mask'].sum())} prompt tokens, "
          f"{steps} steps (no end tokens)", flush=True)
    preallocated = generate.preallocated_cache
    caches = {"dynamic": lambda model, room: DynamicCache(config=model.config), "preallocated": preallocated}
    times, tokens = {k: [] for k in caches}, {}
    try:
        for _ in range(3):
            for name, make in caches.items():
                generate.preallocated_cache = make
                start = time.perf_counter()
                tokens[name] = generate.greedy_decode(model, enc["input_ids"], enc["attention_mask"], steps, [])
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        generate.preallocated_cache = preallocated
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"median s: dynamic {medians['dynamic']:.1f}, preallocated {medians['preallocated']:.1f}; "
          f"preallocated / dynamic {medians['preallocated'] / medians['dynamic']:.3f}; "
          f"same tokens: {tokens['dynamic'] == tokens['preallocated']}")


if __name__ == "__main__":
    main()
