"""Hydra reference policy (trlX's hydra heads): one frozen trunk, two branches.

When the actor trains only its top k layers (``model.num_layers_unfrozen = k >= 0``), its bottom
``num_layers - k`` layers and embeddings never change, so the reference policy (the initial
policy) shares them. :class:`HydraReference` holds only a frozen copy of the actor's *initial* top
k layers, final norm and LM head (the branch) and reuses the actor's trunk: during the actor's
log-prob forward, a forward pre-hook on the first branch layer (layer ``num_layers - k``; for
k = 0 the final norm) captures the trunk's hidden states ``[S(/TP under SP), b, H]`` and every
other argument megatron's ``TransformerBlock`` passes to that layer (rotary embeddings, mask,
...); the loss function of the same forward then runs the branch on them. One trunk forward per
rollout gives the actor's and the reference's log-probs (PPO), and one per training micro-batch
gives the policy's (with grad) and the reference's (DPO, ``dpo.reference=hydra``).

Parameters (memory): the reference costs k layers + final norm (+ the LM head when it is not tied
to the embedding; a tied LM head is the frozen embedding matrix and is shared, not copied) instead
of a whole model.

Layouts: any TP (with or without SP). Under PP the branch must sit on the last stage (k <= the
layers of the last stage): the hook and the branch run there, inside the actor's pipeline schedule.
A branch point on an earlier stage is refused (see :class:`HydraReference`). The critic's value
head is not branched off this trunk (the critic is a separate server process).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from nemo_rlhf.models.megatron_module import split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.models.policy import GPTPolicyModel, output_layer_at
from nemo_rlhf.rl.advantages import response_mask
from nemo_rlhf.rl.masked import masked_sum


class HydraReference:
    """The reference policy as a frozen branch off ``actor``'s frozen trunk.

    The branch is copied from the actor's weights at construction: build it after the actor holds
    the initial policy (e.g. ``load_weights(actor, init_from)``), before any training step, or call
    :meth:`copy_from_actor` then. What a trainer may call: :meth:`actor_and_reference_logprobs`
    (one forward for both, the rollout path), :meth:`logprobs` (the reference's alone), and
    :meth:`capture` with :meth:`captured_logprobs` (the reference inside the actor's own training
    forward: DPO).

    Args:
        actor: the trainable policy, built with ``model.num_layers_unfrozen = k >= 0``.

    Raises:
        ValueError: ``num_layers_unfrozen < 0`` (no frozen trunk), or under PP a branch that does
            not fit on the last pipeline stage (naming k, the layers per stage and the fix).
    """

    def __init__(self, actor: GPTPolicyModel):
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        k = int(actor.model_cfg["num_layers_unfrozen"])
        gpt = actor.gpt
        total = int(gpt.config.num_layers)
        if k < 0:
            raise ValueError("a hydra reference shares the actor's frozen trunk: build the actor with "
                             f"model.num_layers_unfrozen >= 0 (got {k})")
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        last_first = get_transformer_layer_offset(gpt.config, None, pp - 1)  # first layer of the last stage
        if total - k < last_first:
            raise ValueError(
                f"hydra reference under pipeline parallelism: the branch (the top model.num_layers_unfrozen={k} "
                f"layers) must sit on the last stage, which holds layers {last_first}..{total - 1} "
                f"({total - last_first} layers, model.pipeline_model_parallel_size={pp}); lower "
                f"model.num_layers_unfrozen or the pipeline size, or use ppo.reference=full")
        self.actor = actor
        self.num_layers_unfrozen = k
        self.branch_start = total - k  # global index of the first branch layer
        self.branch = torch.nn.Module()  # empty on stages other than the last
        self._captured: tuple[tuple, dict] | None = None  # capture(): the branch point's latest inputs
        if gpt.post_process:
            self._build_branch(gpt)
            self.copy_from_actor()

    # ------------------------------------------------------------------ construction
    def _build_branch(self, gpt) -> None:
        from megatron.core import tensor_parallel
        from megatron.core.transformer.spec_utils import build_module

        config, decoder = gpt.config, gpt.decoder
        offset = int(decoder.layers[0].layer_number) - 1 if len(decoder.layers) else self.branch_start
        self._first_local = self.branch_start - offset
        # The copies' random init is overwritten: leave the RNG streams (torch's and megatron's
        # model-parallel tracker, which initialises weights without use_cpu_initialization) untouched.
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker_states = tracker.get_states()
        with torch.random.fork_rng(devices=[]):
            self.branch.layers = torch.nn.ModuleList([
                build_module(decoder.submodules.layer_specs[j], config=config, layer_number=j + 1,
                             pg_collection=decoder.pg_collection, vp_stage=decoder.vp_stage)
                for j in range(self._first_local, len(decoder.layers))])
            self.branch.final_layernorm = build_module(decoder.submodules.layer_norm, config=config,
                                                       hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            if not gpt.share_embeddings_and_output_weights:
                self.branch.output_layer = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, gpt.vocab_size, config=config, init_method=config.init_method,
                    bias=False, skip_bias_add=False, gather_output=False, tp_group=gpt.pg_collection.tp)
        tracker.set_states(tracker_states)
        self.branch.to(next(gpt.parameters()).device)
        self.branch.requires_grad_(False)
        self.branch.eval()

    @torch.no_grad()
    def copy_from_actor(self) -> None:
        """Copy the actor's current top k layers, final norm and (untied) LM head into the branch."""
        gpt = self.actor.gpt
        if not gpt.post_process:
            return
        for i, layer in enumerate(self.branch.layers):
            layer.load_state_dict(gpt.decoder.layers[self._first_local + i].state_dict())
        self.branch.final_layernorm.load_state_dict(gpt.decoder.final_layernorm.state_dict())
        if hasattr(self.branch, "output_layer"):
            self.branch.output_layer.load_state_dict(gpt.output_layer.state_dict())

    # ------------------------------------------------------------------ accessors
    @property
    def model_device(self) -> torch.device:
        return self.actor.model_device

    def parameter_bytes(self) -> int:
        """Bytes of the parameters the reference adds to the actor on this rank (the branch; a tied
        LM head is the actor's frozen embedding and adds nothing)."""
        return sum(p.numel() * p.element_size() for p in self.branch.parameters())

    def _hook_target(self, gpt):
        if self.num_layers_unfrozen == 0:
            return gpt.decoder.final_layernorm
        return gpt.decoder.layers[self._first_local]

    def _branch_logits(self, args: tuple, kwargs: dict, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Branch forward from the captured inputs of the branch point -> logits ``[b, S, V/TP]``
        (``[b, R, V/TP]`` at ``positions [b, R]`` only, when given: :func:`output_layer_at`)."""
        gpt = self.actor.gpt
        if self.num_layers_unfrozen == 0:
            hidden = args[0]
        else:
            hidden = kwargs["hidden_states"]
            for layer in self.branch.layers:
                hidden, _ = layer(**{**kwargs, "hidden_states": hidden})
        hidden = self.branch.final_layernorm(hidden)
        head = self.branch.output_layer if hasattr(self.branch, "output_layer") else gpt.output_layer
        with output_layer_at([head], positions):
            if head is gpt.output_layer:  # tied: the LM head is the (frozen, shared) embedding matrix
                logits, _ = head(hidden, weight=gpt.shared_embedding_or_output_weight())
            else:
                logits, _ = head(hidden)
        return logits.transpose(0, 1).contiguous()

    # ------------------------------------------------------------------ log-probs
    @contextlib.contextmanager
    def capture(self) -> Iterator["HydraReference"]:
        """Within the block, every forward of the actor (with or without grad) records the inputs
        of the branch point (on the last pipeline stage; elsewhere nothing is recorded), and
        :meth:`captured_logprobs` runs the frozen branch on the latest record.

        For trainers whose loss needs the reference on the very batch the actor is training on
        (DPO with ``dpo.reference=hydra``): call :meth:`captured_logprobs` from the loss function of
        that forward (megatron's schedules run a micro-batch's loss right after its forward), and
        the trunk runs once for both policies. The recorded hidden states come from the frozen
        trunk, so they carry no graph.
        """
        handle = None
        if self.actor.gpt.post_process:
            handle = self._hook_target(self.actor.gpt).register_forward_pre_hook(self._record, with_kwargs=True)
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()
            self._captured = None

    def _record(self, module, args, kwargs) -> None:
        self._captured = (args, kwargs)

    @torch.no_grad()
    def captured_logprobs(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The reference policy's float32 log-probs ``[b, S-1]`` of ``tokens [b, S]`` (the
        micro-batch whose actor forward was recorded last, inside :meth:`capture`); last stage only.
        With ``positions [b, R]`` (:meth:`GPTPolicyModel.response_positions`): ``[b, R]``, the
        log-probs of the tokens those positions predict, the LM head run there only.

        Raises:
            RuntimeError: no forward was recorded (called outside :meth:`capture`, or twice for one
                forward).
        """
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("HydraReference.captured_logprobs: no actor forward recorded since the last call; "
                               "run the actor's forward inside HydraReference.capture() first")
        actor = self.actor
        logits = self._branch_logits(*captured, positions=positions)
        if positions is not None:
            return actor.logprobs_at(logits, tokens, positions, inplace=True)
        return actor.response_logprobs(actor.masked_logits(logits).clone(), tokens, inplace=True)

    @torch.no_grad()
    def actor_and_reference_logprobs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the actor that also runs the reference branch on the trunk's hidden states.

        Args:
            tokens: ``[B, S]`` int64 (right padded).

        Returns:
            ``(actor, reference)`` float32 log-probs ``[B, S-1]`` of ``tokens[:, 1:]`` (the
            convention of :meth:`GPTPolicyModel.logprobs`; the actor's equal that method's), on
            every rank.
        """
        actor = self.actor
        actor.model.eval()

        def loss_fn(mb, logits):
            lp = actor.response_logprobs(actor.masked_logits(logits).clone(), mb["tokens"], inplace=True)
            return logits.sum() * 0, {"lp": lp, "ref_lp": self.captured_logprobs(mb["tokens"])}

        with self.capture():
            mbs = split_microbatches({"tokens": tokens}, actor.microbatch_size_for(tokens.shape[0]))
            outs = actor.forward_backward(mbs, actor.forward_step, loss_fn, forward_only=True)
        b, s = tokens.shape
        lp = broadcast_from_last_stage(torch.cat([o["lp"] for o in outs]) if outs else None, (b, s - 1),
                                       torch.float32)
        ref = broadcast_from_last_stage(torch.cat([o["ref_lp"] for o in outs]) if outs else None, (b, s - 1),
                                        torch.float32)
        return lp, ref

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` -> the reference policy's ``[B, S-1]`` float32 log-probs on every rank
        (through :meth:`actor_and_reference_logprobs`: the actor's top k layers run as well)."""
        return self.actor_and_reference_logprobs(tokens)[1]

    @torch.no_grad()
    def response_logps(self, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` -> ``[B]`` float32 summed log-probs (nats) of each row's response tokens
        (positions ``P-1 .. L-2``) under the reference, on every rank (as
        :meth:`GPTPolicyModel.response_logps`; through :meth:`logprobs`)."""
        mask = response_mask(prompt_lengths, lengths, tokens.shape[1])
        return masked_sum(self.logprobs(tokens), mask.to(tokens.device), dim=1)
