"""SmolLM2-135M-Instruct converted once per test session, with transformers' reference outputs.

Run as ``python tests/smollm2_run.py OUT`` (by the ``smollm2`` fixture in tests/conftest.py, in a
fresh interpreter: in a process where megatron's CPU layer is active, transformers 5.23's
``from_pretrained`` leaves the RoPE ``inv_freq`` buffer uninitialised). It loads the GGUF file
ONCE with transformers (the slow part: the gguf reader and dequantization, ~15 s of CPU) and
from that one in-memory model

* converts it with :func:`nemo_rlhf.checkpoint.hf.import_hf_model`, the path behind
  :func:`nemo_rlhf.checkpoint.gguf.import_gguf` (``import_gguf`` = ``load_gguf`` + this), into
  ``OUT/policy`` (``weights/``, ``model_config.yaml``, tokenizer files);
* writes the IMDB pipeline smoke test's truncated base models into ``OUT/cache``
  (:func:`nemo_rlhf.checkpoint.cache.converted_models`, from the same loaded model);
* records transformers' outputs in ``OUT/reference.pt``: the chat-formatted prompts
  (``apply_chat_template(..., add_generation_prompt=True)`` ids), fp32 logits ``[S, V]`` of the
  first :data:`N_LOGIT_PROMPTS` prompts with the eager attention (``logits``) and with the default
  SDPA attention (``logits_sdpa``), greedy ``generate`` (eager attention) of :data:`NEW_TOKENS`
  tokens for every prompt, all prompts in one left-padded batch, with EOS stopping off (so all 32
  tokens are compared, also after an ``<|im_end|>``), and the chat ids of a multi-turn dialogue;
* writes ``OUT/timings.json`` (seconds: load, conversion, reference).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me three tips for better sleep.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Name a fruit that is yellow.",
    "What does a CPU do?",
    "Tell me a short joke.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "Summarise the plot of Cinderella in two sentences.",
]
# An HH-style multi-turn dialogue with a system message and special tokens / unicode in the text.
DIALOGUE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Can you help me plan a trip to Kyoto? \u4eac\u90fd"},
    {"role": "assistant", "content": "Sure! How many days do you have?"},
    {"role": "user", "content": "Three days, in  spring.\n\nAlso: what is <|im_end|>?"},
    {"role": "assistant", "content": "Day 1: Fushimi Inari. Day 2: Arashiyama. Day 3: Gion."},
]
N_LOGIT_PROMPTS = 3
NEW_TOKENS = 32
PIPELINE_POLICY_LAYERS, PIPELINE_RM_LAYERS = 2, 1  # tests/integration/test_imdb_pipeline.py


def main(out: Path) -> None:
    from nemo_rlhf.checkpoint.cache import converted_models
    from nemo_rlhf.checkpoint.gguf import load_gguf, smollm2_gguf_path
    from nemo_rlhf.checkpoint.hf import import_hf_model

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    model, tokenizer = load_gguf(path)
    t1 = time.perf_counter()
    import_hf_model(model, out / "policy", role="policy", tokenizer=tokenizer, source=str(path))
    # The pipeline smoke test's base models (a 2-layer policy, a 1-layer reward model), in the cache
    # layout launchers/run_demo.py reads (base_model=smollm2 cache_dir=OUT/cache).
    converted_models("smollm2", [("policy", PIPELINE_POLICY_LAYERS), ("reward", PIPELINE_RM_LAYERS)],
                     cache_dir=out / "cache", loaded=(model, tokenizer))
    t2 = time.perf_counter()

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    dialogue = {g: tokenizer.apply_chat_template(DIALOGUE, add_generation_prompt=g, tokenize=True,
                                                 return_dict=False) for g in (False, True)}
    # Greedy; EOS stopping off: all NEW_TOKENS tokens are compared, also past an <|im_end|>. (Set on
    # the model's own generation config: generate() fills unset fields of a config passed to it,
    # eos_token_id=None included, from that one.)
    gen_cfg = model.generation_config
    gen_cfg.do_sample, gen_cfg.max_new_tokens, gen_cfg.eos_token_id = False, NEW_TOKENS, None
    logits, logits_sdpa, generated = [], [], []
    with torch.no_grad():
        for ids in prompts[:N_LOGIT_PROMPTS]:  # transformers' default attention (torch SDPA)
            logits_sdpa.append(model(input_ids=torch.tensor([ids])).logits[0].float())
        # The eager attention (matmul, softmax in fp32, matmul) computes what megatron's local
        # attention computes, in the same order: our logits equal these bit for bit (measured);
        # SDPA's fused kernel differs from eager by up to 8e-5 on these prompts.
        model.set_attn_implementation("eager")
        for ids in prompts[:N_LOGIT_PROMPTS]:
            logits.append(model(input_ids=torch.tensor([ids])).logits[0].float())
        # All prompts in one batch, left-padded (the attention mask hides the padding; positions
        # count from each prompt's first token): 16x fewer decoding steps than one prompt at a time
        # (66 s -> a few seconds of the session's set-up), the same greedy tokens.
        width = max(len(ids) for ids in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        x = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        y = model.generate(x, attention_mask=mask, pad_token_id=pad)
        generated = y[:, width:].tolist()
        if y.shape[1] - width != NEW_TOKENS:
            raise RuntimeError(f"transformers generated {y.shape[1] - width} tokens, not {NEW_TOKENS}")
    t3 = time.perf_counter()
    torch.save({"questions": QUESTIONS, "prompts": prompts, "logits": logits, "logits_sdpa": logits_sdpa,
                "generated": generated,
                "dialogue": DIALOGUE, "dialogue_ids": dialogue, "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id, "chat_template": tokenizer.chat_template},
               out / "reference.pt")
    (out / "timings.json").write_text(json.dumps({
        "load_gguf_s": round(t1 - t0, 1), "convert_s": round(t2 - t1, 1),
        "transformers_reference_s": round(t3 - t2, 1), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
