"""The ILQL policy: a megatron GPT language model with ILQL heads on its trunk (Snell et al. 2022;
trlX ``AutoModelForCausalLMWithILQLHeads`` / ``ILQLHeads``).

Heads (:class:`ILQLHeads`, ``gpt.ilql_heads``, on the last pipeline stage only, as the LM head), each a two-layer MLP
``H -> 2H -> out`` with ReLU as trlX's ``make_head``, reading the trunk's final hidden states
(after the final norm, the LM head's input):

* ``q1``, ``q2`` (``q2`` only with ``two_qs``): Q over the (padded) vocabulary, ``[b, S, V]``,
  trained by the ILQL losses; ``q_head="lm_head"`` instead reads Q through the LM head's own output
  matrix, ``Q = W_lm MLP(h)`` with an ``H -> 2H -> H`` MLP (``_LMHeadQ``: tokens with alike output
  embeddings share what one of them learns; half the vocabulary-wide cost);
* ``target_q1``, ``target_q2``: frozen copies (``requires_grad=False``: no gradient buffer, no
  optimizer state), moved towards the online heads by Polyak averaging
  (:meth:`GPTILQLModel.sync_target_heads`, ``ilql.alpha``); their minimum is the value target and
  the decoding advantage;
* ``v``: the state value, ``[b, S]``.

The heads are a submodule of the ``GPTModel`` built before DDP and the optimizer
(:meth:`~nemo_rlhf.models.megatron_module.MegatronGPTModule.extend_model`), so they train with the
trunk (the Q / V / CQL losses reach the trunk through the hidden states, as in trlX), are reduced
over data parallel, and are saved in every weights / training checkpoint under ``ilql_heads.*``
(an SFT checkpoint loads with ``skip_prefixes=("ilql_heads.",)``; an ILQL checkpoint loads into a
plain :class:`~nemo_rlhf.models.policy.GPTPolicyModel`, which ignores the heads).

Hidden states: a forward hook on ``gpt.decoder.final_layernorm`` captures ``[S, b, H]`` during
the same forward that gives the logits (training, evaluation and every KV-cache decode step), so
one trunk forward serves the LM head and the ILQL heads. With sequence parallelism the captured
states are ``[S/TP, b, H]``; they are all-gathered over the sequence before the heads (as the LM
head's column-parallel input does; the backward keeps each rank's own slice).

Layouts: every TP x PP x DP (+ sequence parallelism). The heads are megatron TP linears: Q and
target Q ``[b, S, V/TP]`` split over the vocabulary like the LM head (fc1 column-parallel gathered,
fc2 column-parallel), V column- then row-parallel (replicated ``[b, S]``). The ILQL loss reads Q
vocabulary-parallel (``algorithms/ilql.py``'s ``ilql_loss_fn``); decoding all-gathers the target
Q of the one decoded position over TP, as the sampler gathers the logits, and shifts the full
``[B, V]`` logits. Under PP the heads, their loss, the Polyak sync and the decoding shift live on
the last stage; the dist-checkpoint reshards them like every TP linear
(tools/parity.py role ``ilql``, tests/multiprocess/test_layout_parity.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from nemo_rlhf.generation.sampling import GenerationOutput, SamplingParams, generate
from nemo_rlhf.models.builder import config_without_sequence_parallel
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.vocab_parallel import vocab_parallel_linear_at
from nemo_rlhf.rl.ilql import ilql_decode_logits, polyak_update_

HEADS_PREFIX = "ilql_heads."  # parameter-name prefix of the heads in the GPTModel's state dict


def _heads_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import MegatronModule

    class _MLPHead(MegatronModule):
        """``[..., H] -> [..., out]``: ``fc2(relu(fc1(x)))``, fc1 ``H -> 2H`` (trlX's ``make_head``).

        ``vocab=True``: fc1 gathers its output, fc2 is column-parallel without gather (output split
        over the vocabulary like the LM head, ``[..., out/TP]``); ``vocab=False``: fc1
        column-parallel, fc2 row-parallel (``[..., out]`` replicated)."""

        def __init__(self, config, hidden: int, out: int, vocab: bool, std: float):
            super().__init__(config=config)
            init = lambda w: torch.nn.init.normal_(w, mean=0.0, std=std)  # noqa: E731
            self.fc1 = tensor_parallel.ColumnParallelLinear(hidden, 2 * hidden, config=config, init_method=init,
                                                            bias=True, gather_output=vocab, skip_bias_add=False)
            if vocab:
                self.fc2 = tensor_parallel.ColumnParallelLinear(2 * hidden, out, config=config, init_method=init,
                                                                bias=True, gather_output=False, skip_bias_add=False)
            else:
                self.fc2 = tensor_parallel.RowParallelLinear(2 * hidden, out, config=config, init_method=init,
                                                             bias=True, input_is_parallel=True, skip_bias_add=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.fc1(x)
            out, _ = self.fc2(torch.relu(h))
            return out

        def at_actions(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
            """``x [b, S, H]``, ``actions [b, T]`` (``T <= S``) -> ``[b, T]`` float32: the output at
            position ``t`` and vocabulary id ``actions[b, t]`` only (vocabulary heads; no ``2H x V``
            matmul), replicated over TP."""
            h, _ = self.fc1(x[:, : actions.shape[1]])
            return vocab_parallel_linear_at(torch.relu(h), self.fc2.weight, actions, self.fc2.bias)

    class _LMHeadQ(MegatronModule):
        """``[..., H] -> [..., V/TP]``: ``W_lm g(x)`` with ``g = fc2(relu(fc1(x)))``, ``H -> 2H -> H``
        (fc1 column-parallel, fc2 row-parallel: ``g`` replicated over TP), and ``W_lm [V/TP, H]`` this
        rank's slice of the LM head's output matrix (``output_weight()``, detached: Q never trains
        the LM head). Q of token ``a`` is then the bilinear ``<W_lm[a], g(x)>``: one update of ``g``
        moves the Q of every token whose output embedding is alike (``great`` with ``excellent``),
        where trlX's vocabulary-wide ``fc2`` learns each token's row only from the rows it is taken
        in. Half the cost of :class:`_MLPHead` over the vocabulary (``H x V`` instead of ``2H x V``)
        and ``4H^2`` parameters of its own instead of ``2H x V``. ``fc2`` starts at zero (Q = 0:
        decoding starts as the policy's own distribution at every beta) unless ``zero_start`` is False
        (then normal with ``std``, as ``fc1``)."""

        def __init__(self, config, hidden: int, std: float, output_weight, zero_start: bool = True):
            super().__init__(config=config)
            init = lambda w: torch.nn.init.normal_(w, mean=0.0, std=std)  # noqa: E731
            self.fc1 = tensor_parallel.ColumnParallelLinear(hidden, 2 * hidden, config=config, init_method=init,
                                                            bias=True, gather_output=False, skip_bias_add=False)
            # fc2 starts at zero: Q = 0 over the whole vocabulary, so decoding at any beta starts as the
            # policy's own distribution (a random g would shift it by beta * W_lm g: measured on
            # SmolLM2-135M at beta 8, VADER positive 0.57 -> 0.27 before any training)
            self.fc2 = tensor_parallel.RowParallelLinear(2 * hidden, hidden, config=config,
                                                         init_method=torch.nn.init.zeros_ if zero_start else init,
                                                         bias=True,
                                                         input_is_parallel=True, skip_bias_add=False)
            self._output_weight = output_weight  # a callable, not a submodule: the weight stays the LM head's

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.fc1(x)
            g, _ = self.fc2(torch.relu(h))
            # Each TP rank's Q covers its own vocabulary slice, so its gradient of g is a partial sum:
            # all-reduce it in the backward (the forward is the identity), as the LM head's own
            # column-parallel input does.
            g = tensor_parallel.copy_to_tensor_model_parallel_region(g)
            w = self._output_weight().detach()
            return torch.nn.functional.linear(g, w.to(g.dtype))

        def at_actions(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
            """``x [b, S, H]``, ``actions [b, T]`` (``T <= S``) -> ``[b, T]`` float32:
            ``<W_lm[actions[b, t]], g(x[b, t])>`` only (no ``H x V`` matmul), replicated over TP."""
            h, _ = self.fc1(x[:, : actions.shape[1]])
            g, _ = self.fc2(torch.relu(h))
            return vocab_parallel_linear_at(g, self._output_weight().detach(), actions)

    class ILQLHeads(MegatronModule):
        """Two (or one) Q heads, their frozen target copies and a V head (module docstring).

        Args:
            config: the trunk's ``TransformerConfig`` (sequence parallelism is not used here).
            vocab_size: the padded vocabulary (the LM head's output size).
            two_qs: build ``q2`` / ``target_q2`` (trlX ``two_qs``).
            init_std: std of the normal weight init (None: the trunk's ``init_method_std``).
            q_head: ``mlp`` (trlX's ``make_head``: ``H -> 2H -> V``) or ``lm_head``
                (:class:`_LMHeadQ`: ``H -> 2H -> H``, then the LM head's output matrix).
            output_weight: ``() -> [V/TP, H]`` tensor, the LM head's output matrix; required by
                ``q_head="lm_head"``.
            q_zero_start: ``lm_head`` Q heads start at Q = 0 (their ``fc2`` zero); False: ``fc2``
                normal with ``init_std`` like every other head weight.

        Raises:
            ValueError: an unknown ``q_head``, or ``lm_head`` without ``output_weight``.
        """

        def __init__(self, config, vocab_size: int, two_qs: bool = True, init_std: float | None = None,
                     q_head: str = "mlp", output_weight=None, q_zero_start: bool = True):
            super().__init__(config=config)
            config = config_without_sequence_parallel(config)
            std = config.init_method_std if init_std is None else float(init_std)
            h = config.hidden_size
            self.two_qs = bool(two_qs)
            if q_head == "mlp":
                make_q = lambda: _MLPHead(config, h, vocab_size, True, std)  # noqa: E731
            elif q_head == "lm_head":
                if output_weight is None:
                    raise ValueError("ILQLHeads(q_head='lm_head') needs output_weight (the LM head's matrix)")
                make_q = lambda: _LMHeadQ(config, h, std, output_weight, q_zero_start)  # noqa: E731
            else:
                raise ValueError(f"ILQLHeads: q_head={q_head!r} is not one of mlp, lm_head")
            self.q1 = make_q()
            self.target_q1 = make_q()
            if self.two_qs:
                self.q2 = make_q()
                self.target_q2 = make_q()
            self.v = _MLPHead(config, h, 1, False, std)
            for online, target in self.pairs():
                target.load_state_dict(online.state_dict())
                target.requires_grad_(False)

        def q_heads(self) -> list:
            return [self.q1, self.q2] if self.two_qs else [self.q1]

        def target_heads(self) -> list:
            return [self.target_q1, self.target_q2] if self.two_qs else [self.target_q1]

        def pairs(self) -> list[tuple[Any, Any]]:
            """``[(online Q head, its target copy), ...]``."""
            return list(zip(self.q_heads(), self.target_heads()))

        def forward(self, hidden: torch.Tensor, actions: torch.Tensor | None = None):
            """``hidden [S, b, H]`` -> ``(qs, target_qs, v)``: tuples of ``[b, S, V]`` float32 Q
            (online heads with gradient; target heads detached) and ``v [b, S]`` float32.

            ``actions [b, T]`` (int64, the taken tokens ``tokens[:, 1:]``): the target heads give
            ``[b, T]`` Q of the taken actions only (all the ILQL loss reads of them), skipping their
            vocabulary-wide matmul; the online heads stay ``[b, S, V]`` (CQL needs the vocabulary).

            The heads run batch-first on a contiguous ``[b, S, H]`` copy of the states (small), so
            their ``[b, S, V]`` outputs come out in the loss's layout instead of as transposed
            views of ``[S, b, V]`` tensors."""
            x = hidden.transpose(0, 1).contiguous()
            qs = tuple(h(x).float() for h in self.q_heads())
            with torch.no_grad():
                if actions is None:
                    tqs = tuple(h(x).float() for h in self.target_heads())
                else:
                    tqs = tuple(h.at_actions(x, actions) for h in self.target_heads())
            v = self.v(x).squeeze(-1).float()
            return qs, tqs, v

    return ILQLHeads


class GPTILQLModel(GPTPolicyModel):
    """A :class:`~nemo_rlhf.models.policy.GPTPolicyModel` with ILQL heads (module docstring).

    What a trainer may call, beyond the policy's: :meth:`train_with_heads` /
    :meth:`evaluate_with_heads` (a loss of the logits *and* the heads' outputs),
    :meth:`sync_target_heads` (Polyak), :meth:`generate_ilql` (decoding with the shifted logits).

    Args:
        model_cfg, optim_cfg, vocab_size, micro_batch_size, eos_id, pad_id: as the policy.
        two_qs: two Q heads (and two targets) instead of one.
        head_init_std: std of the heads' normal init (None: ``model.init_method_std``).
        q_head: ``mlp`` (trlX's vocabulary-wide heads) or ``lm_head`` (Q through the LM head's output
            matrix; ``ILQLHeads``).
        q_zero_start: ``lm_head`` Q heads start at Q = 0 (``ILQLHeads``).

    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None, vocab_size: int,
                 micro_batch_size: int, eos_id: int, pad_id: int, two_qs: bool = True,
                 head_init_std: float | None = None, q_head: str = "mlp", q_zero_start: bool = True):
        self._ilql_options = (bool(two_qs), head_init_std, str(q_head), bool(q_zero_start))  # read by extend_model inside super().__init__
        self._hidden: list[torch.Tensor] = []
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size, eos_id, pad_id)

    def extend_model(self, gpt) -> None:
        if not gpt.post_process:  # not the last pipeline stage: no LM head, no ILQL heads
            return
        two_qs, std, q_head, q_zero_start = self._ilql_options
        gpt.ilql_heads = _heads_class()(gpt.config, gpt.vocab_size, two_qs=two_qs, init_std=std, q_head=q_head,
                                        output_weight=gpt.shared_embedding_or_output_weight,
                                        q_zero_start=q_zero_start)

    # ------------------------------------------------------------------ accessors
    @property
    def heads(self):
        """The :class:`ILQLHeads` of this rank (None on a pipeline stage other than the last)."""
        return getattr(self.gpt, "ilql_heads", None)

    def _capture(self, module, args, out) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        if self.gpt.config.sequence_parallel:  # [S/TP, b, H] -> [S, b, H] (off while generating)
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # The heads' first linears all-reduce their input gradient over TP, so each rank's
            # gradient of the gathered states is already whole: the backward keeps this rank's slice.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        self._hidden.append(hidden)

    @contextlib.contextmanager
    def capturing_hidden(self):
        """Inside the block, every forward appends the trunk's final hidden states ``[S, b, H]``
        (the final norm's output, all-gathered over the sequence under sequence parallelism) to
        ``self._hidden``; cleared on exit. Nothing is captured off the last pipeline stage."""
        norm = getattr(self.gpt.decoder, "final_layernorm", None) if self.heads is not None else None
        handle = norm.register_forward_hook(self._capture) if norm is not None else None
        try:
            yield self._hidden
        finally:
            if handle is not None:
                handle.remove()
            self._hidden.clear()

    # ------------------------------------------------------------------ training
    def _with_heads(self, loss_fn, target_at_actions: bool = True):
        """``loss_fn(mb, logits, heads)`` as a megatron loss of ``(mb, logits)``; the target heads give
        Q of the taken actions ``[b, S-1]`` (``target_at_actions``) or over the vocabulary."""
        def wrapped(mb, logits):
            actions = mb["tokens"][:, 1:] if target_at_actions else None
            return loss_fn(mb, logits, self.heads(self._hidden.pop(0), actions))

        return wrapped

    def train_with_heads(self, loss_fn, batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step of ``loss_fn(mb, logits [b, S, V], (qs, target_qs, v))`` (the heads'
        outputs of :class:`ILQLHeads` ``forward`` for the same micro-batch, the target Q at the taken
        actions ``mb["tokens"][:, 1:]``: ``[b, S-1]``) on ``batch``; as
        :meth:`~nemo_rlhf.models.megatron_module.MegatronGPTModule.train_on`."""
        with self.capturing_hidden():
            return self.train_on(self._with_heads(loss_fn), batch, micro_batch_size)

    def evaluate_with_heads(self, loss_fn, batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """Forward-only :meth:`train_with_heads` (metrics averaged, no update)."""
        with self.capturing_hidden():
            return self.evaluate_on(self._with_heads(loss_fn), batch, micro_batch_size)

    @torch.no_grad()
    def sync_target_heads(self, alpha: float) -> None:
        """``target <- alpha * online + (1 - alpha) * target`` for every Q head's parameters
        (:func:`~nemo_rlhf.rl.ilql.polyak_update_`); ``alpha = 1`` copies. Only the last pipeline
        stage holds heads; each TP rank updates its own slices (no communication)."""
        if self.heads is None:
            return
        for online, target in self.heads.pairs():
            polyak_update_(list(target.parameters()), list(online.parameters()), float(alpha))

    # ------------------------------------------------------------------ decoding
    def generate_ilql(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
                      beta: float) -> GenerationOutput:
        """Sample with ILQL's shifted logits ``log_softmax(logits) + beta * (min_i Qtarget_i - V)``
        and ``params.top_k`` (:func:`~nemo_rlhf.rl.ilql.ilql_decode_logits`), then
        ``params``' temperature / top-p / greedy, through the KV-cache loop of
        :func:`~nemo_rlhf.generation.sampling.generate` (its ``logits_processor``); ``beta = 0``
        samples the policy's own distribution. Arguments and result as :meth:`generate`."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        heads = self.heads

        def shift(logits: torch.Tensor) -> torch.Tensor:  # last pipeline stage only
            hidden = self._hidden[-1][-1:]  # [1, b, H]: this step's last position
            self._hidden.clear()
            # [1, b, V/TP] -> [b, V]: the whole vocabulary, as the logits the sampler gathered
            tqs = [gather_from_tensor_model_parallel_region(h(hidden))[0].float() for h in heads.target_heads()]
            v = heads.v(hidden)[0].float()
            return ilql_decode_logits(logits, tqs, v, float(beta), int(params.top_k))

        with self.capturing_hidden():
            return generate(self, prompts, prompt_lengths, params, eos_id=self.eos_id, pad_id=self.pad_id,
                            logits_processor=shift)
