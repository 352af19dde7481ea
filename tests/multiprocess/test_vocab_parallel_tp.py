"""Vocab-parallel log-probs and entropy at TP=2 against the full-vocabulary torch computation,
values and gradients of each rank's logit shard (run under torchrun, gloo)."""

from __future__ import annotations

import textwrap

import pytest

from torchrun_helper import torchrun

pytestmark = pytest.mark.parallel

SCRIPT = textwrap.dedent('''
    import torch
    from nemo_rlhf.utils.hydra import quiet_warnings
    quiet_warnings()
    from megatron.core import parallel_state as ps
    from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_entropy
    from nemo_rlhf.parallel.state import initialize_distributed

    def main():
        initialize_distributed(2, 1, "cpu")
        r = ps.get_tensor_model_parallel_rank()
        g = torch.Generator().manual_seed(0)
        full = 3 * torch.randn(3, 5, 16, generator=g)
        target = torch.randint(0, 16, (3, 5), generator=g)
        weight = torch.rand(3, 5, generator=g)
        sl = slice(r * 8, (r + 1) * 8)
        for name, fn in (("entropy", None), ("logprobs", None)):
            ref = full.clone().requires_grad_(True)
            if name == "entropy":
                logp = torch.log_softmax(ref, -1)
                val = -(logp.exp() * logp).sum(-1)
            else:
                val = torch.log_softmax(ref, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            (val * weight).sum().backward()
            shard = full[..., sl].clone().requires_grad_(True)
            mine = vocab_parallel_entropy(shard) if name == "entropy" else token_logprobs(shard, target)
            (mine * weight).sum().backward()
            dv = (mine - val.detach()).abs().max().item()
            dg = (shard.grad - ref.grad[..., sl]).abs().max().item()
            assert dv < 1e-5 and dg < 1e-5, (name, r, dv, dg)
            print(f"OK {name} rank {r} value {dv:.1e} grad {dg:.1e}")

    if __name__ == "__main__":
        main()
''')


def test_vocab_parallel_logprobs_and_entropy_tp2(tmp_path):
    (tmp_path / "check.py").write_text(SCRIPT)
    proc = torchrun(2, ["check.py"], tmp_path)
    assert proc.stdout.count("OK ") == 4, proc.stdout
